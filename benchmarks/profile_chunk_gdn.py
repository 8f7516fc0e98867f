"""Where the time of the chunked gated delta rule goes: CUDA time per kernel of forward + backward.

Runs rawdelta's chunk_gated_delta_rule forward and backward (bf16, q/k L2-normalised in the kernel)
three times under the torch profiler (CUPTI sees the CuPy launches too) and prints the kernel table.

Usage: PYTHONPATH=. python3 benchmarks/profile_chunk_gdn.py [BxTxHxD]   (default 8x2048x16x128)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from chunk_gdn import RawDelta, make_inputs  # noqa: E402


def main() -> int:
    B, T, H, D = (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8x2048x16x128").split("x"))
    rd = RawDelta(make_inputs(B, T, H, D))
    for _ in range(2):
        rd.fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            rd.fwd_bwd()
        torch.cuda.synchronize()
    print(f"(B, T, H, D) = {(B, T, H, D)}, 3 x (forward + backward); the prepare kernel runs in both passes")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=80))
    return 0


if __name__ == "__main__":
    sys.exit(main())
