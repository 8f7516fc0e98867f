"""The host side of the common chunked state passes (``rawdelta/cuda/common/chunk_pass.cuh``): their option bits
(``PassOptions``) and the outputs a forward pass writes.

Every family's flag word keeps the bits at these positions; a family's own bits take the others (the gated delta
rule's: ``rawdelta/ops/gated_delta_rule/cuda_common.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._arrays import empty

PASS_ROW_NORMS = 32  # the q and k rows' inverse L2 norms are given
PASS_H0 = 1024  # an initial state is given (the reverse pass writes dh0)
PASS_HT = 2048  # the forward pass writes the final state
PASS_VARLEN = 4096  # sequences from cu_seqlens
PASS_DHT = 8192  # the reverse pass starts from the final state's gradient


def input_pass_flags(initial_state: Any, cu_seqlens: Any) -> int:
    """PASS_H0 and PASS_VARLEN as a call's inputs set them (PASS_HT and PASS_DHT depend on the launch)."""
    return (PASS_H0 if initial_state is not None else 0) | (PASS_VARLEN if cu_seqlens is not None else 0)


def forward_outputs(p: Any, heads: int, flags: int) -> tuple[Any, Any, int]:
    """A forward pass's outputs, allocated on the device: o ``[B, T, heads, V]`` in v's dtype, the final state
    ``[N, heads, K, V]`` float32 where ``p.output_final_state`` (else None), and `flags` with PASS_HT where it is
    written. `p`: a family's problem (B, T, N, K, V, v, output_final_state); `heads`: its value heads."""
    import cupy

    o = empty(cupy, (p.B, p.T, heads, p.V), p.v.dtype)
    ht = None
    if p.output_final_state:
        ht = empty(cupy, (p.N, heads, p.K, p.V), np.float32)
        flags |= PASS_HT
    return o, ht, flags
