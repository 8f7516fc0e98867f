"""Forward times of the chunked gated delta rule for the rawdelta first on ``PYTHONPATH``: CUDA events, GPU kernel
time (torch profiler) and CUDA-graph replay at the two benchmark shapes, as one JSON line. For comparing two trees
run one after the other on the same machine (``docs/benchmarks.md``, "Commands"); the side-by-side with the peer
is ``chunk_gdn.py``.

Usage: PYTHONPATH=<tree>:benchmarks python3 benchmarks/chunk_gdn_forward_times.py
"""

from __future__ import annotations

import json

import torch
from chunk_gdn import RawDelta, graph_ms_cupy, kernel_ms, make_inputs, time_ms

import rawdelta


def forward_times(B: int, T: int, H: int = 16, D: int = 128) -> dict[str, float | list[float]]:
    x = make_inputs(B, T, H, D)
    run = RawDelta(x)
    run.fwd()
    torch.cuda.synchronize()
    return {
        "event": round(time_ms(run.fwd, iters=20, warmup=5), 4),
        "kernel": [round(kernel_ms(run.fwd, calls=10), 4) for _ in range(2)],
        "graph": round(graph_ms_cupy(lambda stream: RawDelta(x, stream=stream).fwd), 4),
    }


def main() -> None:
    out: dict[str, object] = {"tree": rawdelta.__file__}
    for B, T in ((2, 8192), (8, 2048)):
        out[f"{B}x{T}"] = forward_times(B, T)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
