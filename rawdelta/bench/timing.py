"""Timing one call: warm-up (compilation, autotuning), median of many repetitions, peak memory, ceilings.

Three clocks with one interface: :class:`TorchCudaClock` (CUDA events on torch's current stream, peak
memory from torch's caching allocator, through which CuPy also allocates during the peak-memory call, see
:func:`cupy_allocations_through_torch`), :class:`CupyCudaClock` (CUDA events on CuPy's current stream,
for a GPU without torch; no peak memory) and :class:`HostClock` (``perf_counter``; peak memory by
``tracemalloc``, which sees NumPy's allocations).

Each repetition is bracketed by its own pair of events, so the median is over single calls and an
optional L2 flush (a 256 MiB fill) can precede each of them outside the bracket.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Budget:
    """How long one measurement may take.

    Attributes:
        rep_s: the repetitions stop once about this much time is spent (at least ``min_reps`` of them).
        min_reps: the fewest timed repetitions.
        max_reps: the most timed repetitions.
        warmup: calls after the first (which compiles, autotunes and feeds the gate) before timing.
        max_call_s: a call slower than this (after the first) is reported "too slow", not timed.
        flush_l2: flush the L2 cache before every timed repetition (GPU only).
    """

    rep_s: float = 0.5
    min_reps: int = 3
    max_reps: int = 200
    warmup: int = 2
    max_call_s: float = 2.0
    flush_l2: bool = False


class HostClock:
    """Wall-clock timing of host code (the numpy backend, torch on the CPU)."""

    kind = "cpu"

    def sync(self) -> None:
        pass

    def time_calls(self, fn: Callable[[], Any], n: int, flush: bool) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def peak_bytes(self, fn: Callable[[], Any]) -> int | None:
        """Peak bytes allocated by one call (NumPy's allocations; torch's CPU allocator is not traced)."""
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            out = fn()
            peak = tracemalloc.get_traced_memory()[1] - base
            del out
        finally:
            if started:
                tracemalloc.stop()
        return peak

    def copy_bandwidth(self) -> tuple[float, str]:
        """Bytes read + written per second by a 256 MiB ``np.copyto``."""
        a = np.ones(32 << 20)
        b = np.empty_like(a)
        t = _median_wall(lambda: np.copyto(b, a), 5)
        return 2 * a.nbytes / t, "np.copyto of 256 MiB (read + write)"

    def flop_ceiling(self) -> tuple[float, str]:
        """float32 FLOP/s of a 1024^3 matrix product (torch's CPU kernels compute bf16 in float32; the numpy
        backend's float64 runs at about half this rate)."""
        a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        t = _median_wall(lambda: a @ a, 5)
        return 2 * 1024**3 / t, "measured: float32 1024^3 matmul (numpy)"


def _median_wall(fn: Callable[[], Any], n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class TorchCudaClock:
    """CUDA events on torch's current stream; peak memory from torch's allocator."""

    kind = "gpu"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._flush: Any = None

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def _flush_l2(self) -> None:
        if self._flush is None:
            self._flush = self.torch.empty(FLUSH_BYTES // 4, dtype=self.torch.int32, device="cuda")
        self._flush.zero_()

    def _event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def _elapsed_s(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) * 1e-3

    def time_calls(self, fn: Callable[[], Any], n: int, flush: bool) -> list[float]:
        pairs = [(self._event(), self._event()) for _ in range(n)]
        for start, end in pairs:
            if flush:
                self._flush_l2()
            start.record()
            fn()
            end.record()
        self.sync()
        return [self._elapsed_s(s, e) for s, e in pairs]

    def peak_bytes(self, fn: Callable[[], Any]) -> int | None:
        """Peak bytes allocated during one call, outputs included, over what was allocated before it. CuPy's
        allocations (rawdelta's outputs and workspaces) go through torch's allocator for this call only, so that
        torch's counters see them as they see the torch-based implementations': the timed calls allocate from
        CuPy's own pool, as a CuPy caller's do (the routing is a Python callback per allocation, host time that
        no caller pays)."""
        cuda = self.torch.cuda
        self.sync()
        with cupy_allocations_through_torch("cupy" in sys.modules):
            cuda.reset_peak_memory_stats()
            base = cuda.memory_allocated()
            out = fn()
            self.sync()
            peak = cuda.max_memory_allocated() - base
            del out
        return int(peak)

    def copy_bandwidth(self) -> tuple[float, str]:
        a = self.torch.empty(1 << 30, dtype=self.torch.uint8, device="cuda")
        b = self.torch.empty_like(a)
        t = statistics.median(self.time_calls(lambda: b.copy_(a), 20, False)[2:])
        return 2 * a.numel() / t, "device-to-device copy of 1 GiB (read + write)"

    def flop_ceiling(self) -> tuple[float, str]:
        n = 8192
        a = self.torch.randn(n, n, device="cuda", dtype=self.torch.bfloat16)
        t = statistics.median(self.time_calls(lambda: a @ a, 12, False)[2:])
        return 2 * n**3 / t, f"measured: bf16 {n}^3 matmul (torch)"


class CupyCudaClock(TorchCudaClock):
    """CUDA events on CuPy's current stream, for a GPU without torch (no peak memory)."""

    def __init__(self) -> None:
        import cupy

        self.cp = cupy
        self._flush = None

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()

    def _flush_l2(self) -> None:
        if self._flush is None:
            self._flush = self.cp.empty(FLUSH_BYTES // 4, dtype=self.cp.int32)
        self._flush.fill(0)

    def _event(self) -> Any:
        return self.cp.cuda.Event()

    def _elapsed_s(self, start: Any, end: Any) -> float:
        return self.cp.cuda.get_elapsed_time(start, end) * 1e-3

    def peak_bytes(self, fn: Callable[[], Any]) -> int | None:
        return None

    def copy_bandwidth(self) -> tuple[float, str]:
        a = self.cp.empty(1 << 30, dtype=self.cp.uint8)
        b = self.cp.empty_like(a)
        t = statistics.median(self.time_calls(lambda: self.cp.copyto(b, a), 20, False)[2:])
        return 2 * a.size / t, "device-to-device copy of 1 GiB (read + write)"

    def flop_ceiling(self) -> tuple[float, str]:
        n = 8192
        a = self.cp.ones((n, n), dtype=self.cp.float16)
        t = statistics.median(self.time_calls(lambda: a @ a, 12, False)[2:])
        return 2 * n**3 / t, f"measured: fp16 {n}^3 matmul (CuPy)"


Clock = HostClock | TorchCudaClock | CupyCudaClock


def make_clock(gpu: bool, torch_cuda: bool) -> Clock:
    if not gpu:
        return HostClock()
    return TorchCudaClock() if torch_cuda else CupyCudaClock()


@contextlib.contextmanager
def cupy_allocations_through_torch(enabled: bool) -> Iterator[None]:
    """Route CuPy's allocations (rawdelta's outputs and workspaces) through torch's caching allocator inside
    the block, so torch's peak-memory counters see rawdelta and the torch-based implementations alike
    (:meth:`TorchCudaClock.peak_bytes`)."""
    if not enabled:
        yield
        return
    import cupy
    import torch

    def malloc(nbytes: int) -> Any:
        dev = cupy.cuda.runtime.getDevice()
        buf = torch.empty((nbytes,), dtype=torch.uint8, device=torch.device("cuda", dev))
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buf.data_ptr(), nbytes, buf, dev), 0)

    with cupy.cuda.using_allocator(malloc):
        yield


@dataclass
class Measurement:
    """What one measurement found.

    ``status``: ``"ok"`` (timed), ``"wrong"`` (failed the gate; not timed), ``"unavailable"`` (its first
    call raised: not installed, refused, no such mode), ``"too slow"`` (a warm call took longer than
    ``Budget.max_call_s``), ``"error"`` (failed after a good first call) or ``"skipped"`` (not run: the run's
    time limit).
    """

    status: str
    reason: str | None = None
    first_call_s: float | None = None
    call_s: float | None = None
    samples: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    gate: Any = None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def measure(fn: Callable[[], dict[str, Any]], clock: Clock, budget: Budget,
            gate: Callable[[dict[str, Any]], Any], first_is_warm: bool = False) -> Measurement:
    """Run, gate, warm up and time `fn`.

    The first call (compilation, autotuning) is timed on the wall clock and its outputs go to `gate`
    (returning an object with ``passed`` and ``detail``); a wrong result is returned untimed. A warm call
    slower than ``budget.max_call_s`` is reported as too slow (the first call itself when `first_is_warm`:
    nothing left to compile). Otherwise ``budget.warmup`` more calls, then
    ``clamp(rep_s / call, min_reps, max_reps)`` timed repetitions, then one call for the peak memory.
    """
    try:
        clock.sync()
        t0 = time.perf_counter()
        out = fn()
        clock.sync()
        first = time.perf_counter() - t0
    except Exception as e:
        return Measurement("unavailable", _why(e))
    try:
        verdict = gate(out)
    except Exception as e:
        return Measurement("error", f"gate: {_why(e)}", first_call_s=first)
    del out
    m = Measurement("ok", first_call_s=first, gate=verdict)
    if not verdict.passed:
        m.status, m.reason = "wrong", verdict.detail
        return m
    if first_is_warm and first > budget.max_call_s:
        m.status, m.call_s = "too slow", first
        m.reason = f"too slow ({first:.3g} s/call; limit {budget.max_call_s:g} s)"
        return m
    try:
        call = first
        for i in range(max(budget.warmup, 1 if first > budget.max_call_s else 0)):
            t0 = time.perf_counter()
            fn()
            clock.sync()
            call = time.perf_counter() - t0 if i == 0 else min(call, time.perf_counter() - t0)
            if call > budget.max_call_s:
                m.status, m.call_s = "too slow", call
                m.reason = f"too slow ({call:.3g} s/call; limit {budget.max_call_s:g} s)"
                return m
        m.call_s = call
        reps = int(min(max(budget.rep_s / max(call, 1e-7), budget.min_reps), budget.max_reps))
        m.samples = clock.time_calls(fn, reps, budget.flush_l2)
        m.peak_bytes = clock.peak_bytes(fn)
    except Exception as e:
        m.status, m.reason = "error", _why(e)
    return m
