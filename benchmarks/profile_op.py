"""Where an op's time goes: CUDA time per kernel of its forward + backward on the cuda backend.

Draws the op's inputs with its generator (``benchmarks/accuracy.py``: ``draw``; bf16 q/k/v, float32 gates and the
initial state), runs the raw ``<op>_fwd`` / ``<op>_bwd`` pair (the final state out, ``do`` and ``dht`` in) three
times under the torch profiler (CUPTI sees the CuPy launches too) and prints the kernel table.

Usage: PYTHONPATH=. python3 benchmarks/profile_op.py chunk_gla [BxTxHxD]   (default 8x2048x16x128)
"""

from __future__ import annotations

import sys

import cupy
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from accuracy import draw  # noqa: E402

import rawdelta  # noqa: E402
from rawdelta.ops import registry  # noqa: E402


def main() -> int:
    op = registry.op(sys.argv[1])
    shape = tuple(int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "8x2048x16x128").split("x"))
    kw, do, dht = draw(op, shape, "bfloat16", 0)
    kw = {n: cupy.asarray(x) if hasattr(x, "shape") else x for n, x in kw.items()}
    # do in the inputs' dtype, as an autograd caller passes it (a float32 do would add a cast to every backward)
    do, dht = cupy.asarray(do).astype(kw["q"].dtype), cupy.asarray(dht)
    fwd, bwd = getattr(rawdelta, f"{op.name}_fwd"), getattr(rawdelta, f"{op.name}_bwd")

    def step() -> None:
        _, res = fwd(**kw, output_final_state=True, backend="cuda")
        bwd(res, do, dht)

    for _ in range(2):
        step()
    cupy.cuda.Device().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        cupy.cuda.Device().synchronize()
    print(f"{op.name} (B, T, H, D) = {shape}, 3 x (forward + backward)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
