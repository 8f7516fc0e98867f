"""The host time of one eager call, and where it goes (cProfile over many calls).

The host time is the wall time per call of a batch of back-to-back calls (300 for decode, 100 for ``chunk_gla``, whose
call launches several kernels: fewer launches than the launch queue holds, so the host never waits for the GPU), the
median of 7 such batches with the GPU idle before each. Beside it, the GPU time per call
of the same back-to-back calls (CUDA events): where the host time is the larger, the eager call is bound by the host.

Decode (the default ops): 64 sequences x 1 token, 32 heads, D = 128, fp16, an in-place float32 state. ``chunk_gla``:
the plain call (no initial state, no final state) at ``--shape`` (default 8x2048x16x128), bf16 q/k/v and float32
log gates; ``--torch``: through ``rawdelta.torch`` on torch tensors without autograd (the adapter's eager path).

Usage: PYTHONPATH=. python3 benchmarks/profile_host.py [--op fused_recurrent_gated_delta_rule | fused_recurrent_gla |
chunk_gla] [--shape BxTxHxD] [--torch]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import cupy
import numpy as np

import rawdelta
from rawdelta._arrays import BFLOAT16

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--op", default="fused_recurrent_gated_delta_rule",
                choices=("fused_recurrent_gated_delta_rule", "fused_recurrent_gla", "chunk_gla"))
ap.add_argument("--shape", default="8x2048x16x128", help="chunk_gla: BxTxHxD (K = V = D)")
ap.add_argument("--torch", action="store_true", help="chunk_gla: through rawdelta.torch, no autograd")
ARGS = ap.parse_args()
OP = ARGS.op

N, H, D = 64, 32, 128
rng = np.random.default_rng(0)
q, k, v = (cupy.asarray(rng.standard_normal((N, 1, H, D)).astype(np.float32)).astype(cupy.float16) for _ in range(3))
g = cupy.asarray(-rng.random((N, 1, H)).astype(np.float32))
beta = cupy.asarray(rng.random((N, 1, H)).astype(np.float32))
gk = cupy.asarray(-rng.random((N, 1, H, D)).astype(np.float32) / 16)
state = cupy.zeros((N, H, D, D), np.float32)


# the op chosen once, so the timed calls carry no branch of this script's
if OP == "chunk_gla":
    B, T, H, D = (int(x) for x in ARGS.shape.split("x"))
    cq, ck, cv = (cupy.asarray(rng.standard_normal((B, T, H, D)).astype(np.float32)).astype(BFLOAT16)
                  for _ in range(3))
    cg = cupy.asarray(np.log(rng.uniform(0.9, 1.0, (B, T, H, D))).astype(np.float32))
    if ARGS.torch:
        import torch

        import rawdelta.torch as rt

        tq, tk, tv, tg = (torch.from_dlpack(x) for x in (cq, ck, cv, cg))

        def call() -> None:
            with torch.no_grad():
                rt.chunk_gla(tq, tk, tv, tg)
    else:
        def call() -> None:
            rawdelta.chunk_gla(cq, ck, cv, cg)
elif OP == "fused_recurrent_gla":
    def call() -> None:
        rawdelta.fused_recurrent_gla(q, k, v, gk, initial_state=state, inplace_final_state=True)
else:
    def call() -> None:
        rawdelta.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, inplace_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)


CALLS = 100 if OP == "chunk_gla" else 300
for _ in range(20):
    call()
cupy.cuda.Device().synchronize()
runs = []
for _ in range(7):
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        call()
    runs.append((time.perf_counter() - t0) / CALLS)
cupy.cuda.Device().synchronize()
WHAT = f"{OP}{' through rawdelta.torch' if ARGS.torch else ''}"
print(f"{WHAT}: host time per eager call: {statistics.median(runs) * 1e6:.1f} us (median of 7 runs of {CALLS} calls)")
gpu = []
for _ in range(7):
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(CALLS):
        call()
    end.record()
    end.synchronize()
    gpu.append(cupy.cuda.get_elapsed_time(start, end) / CALLS)
print(f"{WHAT}: GPU time per back-to-back call: {statistics.median(gpu) * 1e3:.1f} us "
      f"(median of 7 runs of {CALLS} calls)")
# profiled in batches with the GPU idle before each, so no call waits for a full launch queue
pr = cProfile.Profile()
for _ in range(1500 // CALLS):
    cupy.cuda.Device().synchronize()
    pr.enable()
    for _ in range(CALLS):
        call()
    pr.disable()
cupy.cuda.Device().synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
