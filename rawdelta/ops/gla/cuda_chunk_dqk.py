"""The CUDA chunked GLA's last backward stage (``rawdelta/cuda/gla/chunk_bwd_dqk.cu``): per chunk, head and slice of
:data:`KS` keys, dq, dk and the gate gradient dg, on tensor cores (mma.sync), by persistent blocks. Its
instantiations, their registration with the loader, their dynamic shared memory, grid and launch.

Template arguments: ``ct`` the input C type (``launch.CTYPES``), the mma type (``launch.MMA_TYPE``), ``bt`` the chunk
size, the key slice :data:`KS` and the value columns :data:`BVB` of each step of the kernel's loop over V.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...cuda import launch
from ...cuda.launch import MMA_TYPE
from ...cuda.loader import register
from ..common.cuda_smem import PAD, SM_SMEM, f32, in_tile, r16, raw_tile, split
from .definition import CHUNK_SIZES

DQK_SOURCE = "gla/chunk_bwd_dqk.cu"
DQK_KERNEL = "gla_chunk_bwd_dqk_kernel"
KS = 64  # keys per block (the kernel's four threads per key of its h . dh sums need 4 KS = 256 threads)
BVB = 64  # value columns per step of the loop over V
THREADS = 256


def dqk_name(ct: str, bt: int) -> str:
    """The instantiation for input C type `ct` and chunk size `bt`."""
    return f"{DQK_KERNEL}<{ct}, {MMA_TYPE[ct]}, {bt}, {KS}, {BVB}>"


register(DQK_SOURCE, [dqk_name(ct, bt) for ct in launch.CTYPES.values() for bt in CHUNK_SIZES])


def dqk_smem(ct: str, bt: int) -> int:
    """Dynamic shared-memory bytes of :func:`dqk_name`'s kernel, as it carves them: the gates G (float) and reset
    counts R (uint8) of its keys, h . dh per key, the scores' diagonal and the diagonal blocks' flags; stage A of the
    loop over V's tiles (do, v: bt rows; h, dh: KS rows; input precision); the region that holds stage B, then the
    scores and one scaled operand (split), then dG and k dx (float); q and k (input type)."""
    ldf, ldq, ldv, ldm = KS + 4, KS + PAD, BVB + PAD, bt + PAD
    fixed = f32(bt * ldf) + r16(bt * ldf) + f32(KS) + f32(bt) + f32(4)
    stage = 2 * in_tile(ct, bt * ldv) + 2 * in_tile(ct, KS * ldv)
    region = max(stage, split(bt * ldm) + split(bt * ldq), 2 * f32(bt * ldf))
    return fixed + stage + region + 2 * raw_tile(ct, bt * ldq)


def dqk_blocks_per_sm(ct: str, bt: int) -> int:
    """Resident blocks per SM the kernel is written for: two where their shared memory (with the 1 KB static and the
    1 KB the driver reserves per block) fits an H100 SM (its registers are bounded for two), else one."""
    return 2 if 2 * (dqk_smem(ct, bt) + 2048) <= SM_SMEM else 1


def launch_dqk(ct: str, bt: int, nc: int, H: int, K: int, V: int, scale: float, *, q: Any, k: Any, v: Any, do: Any,
               g: Any, Rc: Any, Dk: Any, hbuf: Any, dhbuf: Any, chunk_bos: Any, chunk_len: Any, dq: Any,
               dk: Any, dg: Any) -> None:
    """Launch the dq/dk/dg kernel on the current stream: persistent blocks (as many as are resident at once, at most
    one per item) over the items (chunk, head, slice of KS keys).

    Args:
        ct: input C type (``launch.CTYPES``); bt: chunk size (16, 32 or 64); nc: chunks in all (NC); H, K, V: heads,
            key and value dimensions; scale: the output scale.
        q, k: ``[B, T, H, K]``; v, do: ``[B, T, H, V]`` (input dtype, contiguous; B * T tokens flattened).
        g: ``[B, T, H, K]`` float32, the gates (the kernel recomputes their chunk-local cumsum and reset counts);
            Rc: ``[B, T, H]`` int32 row codes; Dk: ``[NC, H, K]`` float32, each chunk's decay 2^G_last
            (``rawdelta/cuda/gla/chunk.cuh``).
        hbuf, dhbuf: ``[NC, H, K, V]`` (input dtype): the state at each chunk's start, its gradient at the chunk's end.
        chunk_bos: ``[NC]`` int64, each chunk's first token; chunk_len: ``[NC]`` int32, its length.
        dq, dk: ``[B, T, H, K]`` (input dtype) and dg: ``[B, T, H, K]`` float32, written (NaN from each chunk's first
            dead row on).
    """
    nks = (K + KS - 1) // KS
    items = nc * H * nks
    grid = min(items, dqk_blocks_per_sm(ct, bt) * launch.sm_count())
    launch.launch(DQK_SOURCE, dqk_name(ct, bt), grid, THREADS, dqk_smem(ct, bt), (
        q, k, v, do, g, Rc, Dk, hbuf, dhbuf, chunk_bos, chunk_len, dq, dk, dg, np.int32(H), np.int32(K),
        np.int32(V), np.int32(nks), np.int32(items), np.float32(scale)))
