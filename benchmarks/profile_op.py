"""Where an op's time goes: CUDA time per kernel of its forward + backward on the cuda backend.

Draws the op's inputs with its generator (``benchmarks/accuracy.py``: ``draw``; bf16 q/k/v, float32 gates and the
initial state), runs the raw ``<op>_fwd`` / ``<op>_bwd`` pair (the final state out, ``do`` and ``dht`` in) `--calls`
times (default 3) under the torch profiler (CUPTI sees the CuPy launches too) and prints the kernel table. With
``--json`` it prints one JSON line instead: each kernel's mean CUDA time per call (µs), and the median time of a
forward (the plain ``<op>`` call, which keeps nothing for a backward) and of a forward + backward over 30 calls each,
timed by CUDA events around each call (ms). An A/B of two
trees runs it once per tree, alternated, one process each: ``PYTHONPATH=<tree>:benchmarks``.

Usage: PYTHONPATH=.:benchmarks python3 benchmarks/profile_op.py chunk_gla [BxTxHxD] [--calls N] [--json]
(default shape 8x2048x16x128)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import cupy
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from accuracy import draw  # noqa: E402

import rawdelta  # noqa: E402
from rawdelta.ops import registry  # noqa: E402


def profiled(fn: Callable[[], object], calls: int, warm: int = 2) -> profile:
    """The torch profiler (CUDA activity; CUPTI sees CuPy's launches too) over `calls` calls of `fn`, after `warm`
    calls and a synchronisation."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_means_us(prof: profile, calls: int) -> dict[str, float]:
    """Each kernel's mean CUDA time per call (µs), keyed by its name, from a profile of `calls` calls."""
    return {e.key: round(e.device_time_total / calls, 1) for e in prof.key_averages()
            if getattr(e, "device_time_total", 0) > 0}


def event_median_ms(fn: Callable[[], object], calls: int = 30) -> float:
    """Median over `calls` back-to-back calls of the GPU time between CUDA events recorded around each."""
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(calls)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    cupy.cuda.Device().synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in events]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op")
    ap.add_argument("shape", nargs="?", default="8x2048x16x128", help="BxTxHxD (K = V = D)")
    ap.add_argument("--calls", type=int, default=3, help="forward + backward calls under the profiler")
    ap.add_argument("--json", action="store_true", help="one JSON line of per-kernel means and call medians")
    args = ap.parse_args()
    op = registry.op(args.op)
    shape = tuple(int(x) for x in args.shape.split("x"))
    kw, do, dht = draw(op, shape, "bfloat16", 0)
    kw = {n: cupy.asarray(x) if hasattr(x, "shape") else x for n, x in kw.items()}
    # do in the inputs' dtype, as an autograd caller passes it (a float32 do would add a cast to every backward)
    do, dht = cupy.asarray(do).astype(kw["q"].dtype), cupy.asarray(dht)
    plain, fwd, bwd = (getattr(rawdelta, op.name + suffix) for suffix in ("", "_fwd", "_bwd"))

    def forward() -> object:
        return fwd(**kw, output_final_state=True, backend="cuda")[1]

    def inference() -> object:
        return plain(**kw, output_final_state=True, backend="cuda")

    def step() -> None:
        bwd(forward(), do, dht)

    prof = profiled(step, args.calls)
    if not args.json:
        print(f"{op.name} (B, T, H, D) = {shape}, {args.calls} x (forward + backward)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=90))
        return 0
    print(json.dumps({"op": op.name, "shape": shape, "kernels_us": kernel_means_us(prof, args.calls),
                      "forward_ms": round(event_median_ms(inference), 4),
                      "forward_backward_ms": round(event_median_ms(step), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
