"""chunk_gla's forward and forward + backward with its forward-direction state passes cut into each given number of
segments per sequence (``rawdelta/ops/common/segments.py``): the median of 30 calls each (CUDA events), the counts
alternated in one process on the same inputs (``profile_op.py``'s: bf16 q/k/v, float32 gates).

Usage: PYTHONPATH=.:benchmarks python3 benchmarks/gla_segments.py [BxTxHxD] [--segments 1 2 4] [--rounds 2]
(default 2x8192x16x128, segments 1 2 4; 1 is the unsegmented pass)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import cupy

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from accuracy import draw  # noqa: E402
from profile_op import event_median_ms  # noqa: E402

import rawdelta  # noqa: E402
from rawdelta.ops import registry  # noqa: E402
from rawdelta.ops.gla import cuda_chunk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", nargs="?", default="2x8192x16x128", help="BxTxHxD (K = V = D)")
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2, help="times each count is timed, alternated")
    args = ap.parse_args()
    chunk_forward, chunk_backward = cuda_chunk.chunk_forward, cuda_chunk.chunk_backward
    current = [1]

    def forward(p: Any, workspace: Any = None) -> tuple[Any, Any]:
        o, ht, ch = chunk_forward(p, p.chunk_size, workspace=workspace, segments=current[0])
        return (o, ht), ch

    cuda_chunk.forward = forward
    cuda_chunk.backward = lambda p, saved, do, dht: chunk_backward(p, p.chunk_size, do, dht, saved=saved,
                                                                   segments=current[0])
    shape = tuple(int(x) for x in args.shape.split("x"))
    kw, do, dht = draw(registry.op("chunk_gla"), shape, "bfloat16", 0)
    kw = {n: cupy.asarray(x) if hasattr(x, "shape") else x for n, x in kw.items()}
    do, dht = cupy.asarray(do).astype(kw["q"].dtype), cupy.asarray(dht)

    def fwd() -> Any:
        return rawdelta.chunk_gla_fwd(**kw, output_final_state=True, backend="cuda")[1]

    def step() -> None:
        rawdelta.chunk_gla_bwd(fwd(), do, dht)

    print(f"chunk_gla {shape}, bf16: segments per sequence, forward and forward + backward medians (ms)")
    for _ in range(args.rounds):
        for s in args.segments:
            current[0] = s
            step()
            cupy.cuda.Device().synchronize()
            f_ms, fb_ms = event_median_ms(fwd), event_median_ms(step)
            print(f"segments {s:2d}: forward {f_ms:.4f}, forward + backward {fb_ms:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
