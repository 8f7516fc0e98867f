"""The host time of one eager decode call, and where it goes (cProfile over many calls).

The host time is the wall time per call of 300 back-to-back calls (fewer than the launch queue holds, so the host
never waits for the GPU), the median of 7 such runs with the GPU idle before each. Beside it, the GPU time per call
of the same back-to-back calls (CUDA events): where the host time is the larger, eager decode is bound by the host.

Usage: PYTHONPATH=. python3 benchmarks/profile_host.py [--op fused_recurrent_gated_delta_rule | fused_recurrent_gla]
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

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--op", default="fused_recurrent_gated_delta_rule",
                choices=("fused_recurrent_gated_delta_rule", "fused_recurrent_gla"))
OP = ap.parse_args().op

N, H, D = 64, 32, 128
rng = np.random.default_rng(0)
q, k, v = (cupy.asarray(rng.standard_normal((N, 1, H, D)).astype(np.float32)).astype(cupy.float16) for _ in range(3))
g = cupy.asarray(-rng.random((N, 1, H)).astype(np.float32))
beta = cupy.asarray(rng.random((N, 1, H)).astype(np.float32))
gk = cupy.asarray(-rng.random((N, 1, H, D)).astype(np.float32) / 16)
state = cupy.zeros((N, H, D, D), np.float32)


# the op chosen once, so the timed calls carry no branch of this script's
if OP == "fused_recurrent_gla":
    def call() -> None:
        rawdelta.fused_recurrent_gla(q, k, v, gk, initial_state=state, inplace_final_state=True)
else:
    def call() -> None:
        rawdelta.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, inplace_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)


for _ in range(20):
    call()
cupy.cuda.Device().synchronize()
runs = []
for _ in range(7):
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        call()
    runs.append((time.perf_counter() - t0) / 300)
cupy.cuda.Device().synchronize()
print(f"{OP}: host time per eager decode call: {statistics.median(runs) * 1e6:.1f} us (median of 7 runs of 300 "
      "calls)")
gpu = []
for _ in range(7):
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(300):
        call()
    end.record()
    end.synchronize()
    gpu.append(cupy.cuda.get_elapsed_time(start, end) / 300)
print(f"{OP}: GPU time per back-to-back call: {statistics.median(gpu) * 1e3:.1f} us (median of 7 runs of 300 calls)")
pr = cProfile.Profile()
pr.enable()
for _ in range(500):
    call()
pr.disable()
cupy.cuda.Device().synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
