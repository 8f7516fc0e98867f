"""The CUDA chunked GLA's last backward stage (``rawdelta/cuda/gla/chunk_bwd_dqk.cu``): per chunk, head and slice of
:data:`KS` keys, dq, dk and the gate gradient dg, on tensor cores (mma.sync). Its instantiations, their registration
with the loader, their dynamic shared memory and the launch.

Template arguments: ``ct`` the input C type (``launch.CTYPES``), the mma type (``launch.MMA_TYPE``), ``bt`` the chunk
size, the key slice :data:`KS` and the value columns :data:`BVB` of each step of the kernel's loop over V.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...cuda import launch
from ...cuda.launch import MMA_TYPE
from ...cuda.loader import register
from ..common.cuda_smem import PAD, f32, in_tile, split
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


def vloop_stages(ct: str) -> int:
    """Stages of the kernel's V-loop tiles: two for 16-bit inputs (cp.async loads one step ahead), one for float32
    (converted through registers)."""
    return 1 if ct == "float" else 2


def dqk_smem(ct: str, bt: int) -> int:
    """Dynamic shared-memory bytes of :func:`dqk_name`'s kernel, as it carves them: the gates G (float) and reset
    counts R (int) of its keys, h . dh and Dk per key, the scores' diagonal and the diagonal blocks' flags; then the
    larger of the loop over V's tiles (do, v: bt rows; h, dh: KS rows; input precision) and what takes their space
    after it (q, k float; the scores and one scaled operand, split), the loop's tiles in :func:`vloop_stages`
    stages."""
    ldf, ldk, ldv, ldm = KS + 4, KS + PAD, BVB + PAD, bt + PAD
    fixed = 2 * f32(bt * ldf) + 2 * f32(KS) + f32(bt) + f32(4)
    vloop = vloop_stages(ct) * (2 * in_tile(ct, bt * ldv) + 2 * in_tile(ct, KS * ldv))
    after = 2 * f32(bt * ldf) + split(bt * ldm) + split(bt * ldk)
    return fixed + max(vloop, after)


def launch_dqk(ct: str, bt: int, nc: int, H: int, K: int, V: int, scale: float, *, q: Any, k: Any, v: Any, do: Any,
               g: Any, Rc: Any, Dk: Any, hbuf: Any, dhbuf: Any, chunk_bos: Any, chunk_len: Any, dq: Any,
               dk: Any, dg: Any) -> None:
    """Launch the dq/dk/dg kernel on the current stream: one block per (chunk, head, slice of KS keys).

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
    launch.launch(DQK_SOURCE, dqk_name(ct, bt), nc * H * nks, THREADS, dqk_smem(ct, bt), (
        q, k, v, do, g, Rc, Dk, hbuf, dhbuf, chunk_bos, chunk_len, dq, dk, dg, np.int32(H), np.int32(K),
        np.int32(V), np.int32(nks), np.float32(scale)))
