"""The GPU clock's allocation routing, on the CPU with a stand-in for torch's CUDA module: the timed calls allocate
from each implementation's own allocator, and only the peak-memory call routes CuPy's allocations through torch's
(``TorchCudaClock.peak_bytes``)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import pytest

from rawdelta.bench import timing
from rawdelta.bench.timing import Budget, TorchCudaClock, measure


class _Event:
    def record(self) -> None:
        pass

    def elapsed_time(self, end: Any) -> float:
        return 1.0


def _fake_torch(peak: int) -> Any:
    cuda = types.SimpleNamespace(synchronize=lambda: None, reset_peak_memory_stats=lambda: None,
                                 memory_allocated=lambda: 100, max_memory_allocated=lambda: 100 + peak,
                                 Event=lambda enable_timing=True: _Event())
    return types.SimpleNamespace(cuda=cuda)


def test_only_the_peak_memory_call_routes_cupy_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    routed = [False]
    seen: list[bool] = []

    @contextlib.contextmanager
    def routing(enabled: bool) -> Iterator[None]:
        routed[0] = True
        try:
            yield
        finally:
            routed[0] = False

    monkeypatch.setattr(timing, "cupy_allocations_through_torch", routing)
    clock = TorchCudaClock.__new__(TorchCudaClock)
    clock.torch, clock._flush = _fake_torch(4096), None

    def fn() -> dict[str, Any]:
        seen.append(routed[0])
        return {}

    m = measure(fn, clock, Budget(rep_s=0.0, min_reps=3, max_reps=3, warmup=2), lambda out: types.SimpleNamespace(
        passed=True, detail=""))
    assert m.status == "ok" and m.peak_bytes == 4096 and len(m.samples) == 3
    # the first call, two warm-up calls and three timed ones on the implementation's allocator; the last one routed
    assert seen == [False] * 6 + [True]
