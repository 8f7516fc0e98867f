"""An op's plain forward timed several ways in one process: what separates `rawdelta bench`'s figure from
`profile_op.py`'s.

For each shape: the plain ``<op>`` call on ``profile_op.py``'s inputs with and without an initial state and a final
state; on the bench's inputs (``rawdelta.bench.workload.host_inputs``); on the bench's ``Workload`` arrays (DLPack views
of torch tensors) timed by torch's events, the same with CuPy's allocations routed through torch's allocator as the
bench's peak-memory call and the torch adapter route them (``cupy_allocations_through_torch``), and the torch adapter
(``rawdelta.torch``) on the same tensors without autograd. Each variant prints the median of 30 back-to-back calls
between CUDA events (ms), the host's wall time per call (the median and the least over five batches of 30 calls, each
batch issued without a synchronisation; ms) and each kernel's mean CUDA time over ten calls under the torch profiler
(µs). Where the host time per call approaches the event time, the events time the host, not the kernels.

Usage: PYTHONPATH=.:benchmarks python3 benchmarks/forward_variants.py [OP] [BxTxHxD ...]
(default chunk_gla at 2x8192x16x128 and 8x2048x16x128)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from accuracy import draw  # noqa: E402
from profile_op import event_median_ms, kernel_means_us, profiled  # noqa: E402

import rawdelta  # noqa: E402
import rawdelta.torch  # noqa: E402
from rawdelta.bench.env import detect  # noqa: E402
from rawdelta.bench.registry import op_spec  # noqa: E402
from rawdelta.bench.timing import TorchCudaClock, cupy_allocations_through_torch  # noqa: E402
from rawdelta.bench.workload import Workload, host_inputs  # noqa: E402
from rawdelta.ops import registry  # noqa: E402


def host_ms_per_call(fn: Callable[[], object], calls: int = 30, batches: int = 5) -> tuple[float, float]:
    """The host's wall time per call, the median and the least over `batches` batches of `calls` calls issued back to
    back (no synchronisation inside a batch; one before each): a busy host shows as a spread between the two."""
    per_call = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e3)
    torch.cuda.synchronize()
    return float(np.median(per_call)), min(per_call)


def torch_event_median_ms(fn: Callable[[], object], calls: int = 30) -> float:
    """The bench's own clock (torch's events on torch's current stream): the median of `calls` back-to-back calls."""
    return float(np.median(TorchCudaClock().time_calls(fn, calls, False))) * 1e3


def report(label: str, fn: Callable[[], object], events: Callable[[Callable[[], object]], float]) -> None:
    for _ in range(3):
        fn()
    ms = events(fn)
    kernels = {k.split("(")[0].replace("void ", "")[-48:]: t for k, t in kernel_means_us(profiled(fn, 10), 10).items()}
    host, least = host_ms_per_call(fn)
    print(f"  {label}: events {ms:.4f} ms, host {host:.4f} ms/call (least {least:.4f}), kernels (µs) {kernels}",
          flush=True)


def variants(op: Any, shape: tuple[int, ...]) -> None:
    plain = getattr(rawdelta, op.name)
    kw, _, _ = draw(op, shape, "bfloat16", 0)
    kw = {n: cupy.asarray(x) if hasattr(x, "shape") else x for n, x in kw.items()}
    print(shape, flush=True)
    for h0 in (True, False):
        for ht in (True, False):
            args = {n: x for n, x in kw.items() if h0 or n != "initial_state"}
            report(f"profile_op inputs, initial state {h0}, final state {ht}",
                   lambda a=args, f=ht: plain(**a, backend="cuda", output_final_state=f), event_median_ms)
    spec = op_spec(op)
    bench = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x
             for n, x in host_inputs(spec, shape, "forward", "bfloat16", 0).items() if n != "do"}
    report("the bench's inputs", lambda: plain(**bench, backend="cuda"), event_median_ms)
    w = Workload(host_inputs(spec, shape, "forward", "bfloat16", 0), detect())
    arrays = {n: a for n, a in w.arrays("cupy").items() if n != "do"}
    report("the bench's Workload arrays, torch events", lambda: plain(**arrays, backend="cuda"),
           torch_event_median_ms)
    with cupy_allocations_through_torch(True):
        report("the same, CuPy's allocations through torch (as the torch adapter allocates)",
               lambda: plain(**arrays, backend="cuda"), torch_event_median_ms)
    tensors = {n: t for n, t in w.arrays("torch").items() if n != "do"}
    adapter = getattr(rawdelta.torch, op.name)
    with torch.no_grad():
        report("the torch adapter on the Workload's tensors, no grad", lambda: adapter(**tensors),
               torch_event_median_ms)
    w.release()


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "chunk_gla"
    shapes = sys.argv[2:] or ["2x8192x16x128", "8x2048x16x128"]
    op = registry.op(name)
    for s in shapes:
        variants(op, tuple(int(x) for x in s.split("x")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
