"""The cuda backend of :func:`~rawdelta.fused_chunk_gla`: CUDA C kernels on tensor cores (mma.sync).

Forward: one block of 256 threads per (sequence, head, value block of 32, 64 or all V columns) walks the
sequence's chunks with its float32 state block in registers and computes each chunk's factors on chip (every value
block of a head the same factors: with few sequences and heads the value blocks are what fills the GPU,
:func:`fwd_value_block`; the factors are the stage ``chunk_gla``'s prepare writes to global memory:
``rawdelta/cuda/gla/chunk_factors.cuh``), so it writes nothing but ``o`` and the final state: no per-token factor
buffers and no per-chunk states (``rawdelta/cuda/gla/fused_chunk.cu``).

Backward: single-pass with recomputation, two kernels of one block per (sequence, head), each recomputing every
chunk's factors on chip (no checkpoints; nothing written but the gradients and an ``[N, H, K]`` float carry), with
every shared-memory operand split into hi + lo 16-bit parts (:data:`BWD_TILES`) and chunks of the call's size or,
where those tiles do not fit one block, of 32 (:func:`bwd_config`).
Phase 1 (forward in time) recomputes the state as the forward does and writes dq, and into dg ``q dq`` without its
diagonal terms; at the last chunk it leaves the carry of the final state's decay. Phase 2 (reverse in time, the
state gradient in registers) writes dv, dk, dg and dh0; the intra-chunk stages are the chunked dq/dk/dg kernel's
(``rawdelta/cuda/gla/chunk_bwd_intra.cuh``). dg is a per-key running sum carried across chunk boundaries in float32
whose terms cancel down to a much smaller gradient: with 16-bit operands their rounding did not cancel and grew with
the sequence length, which the split operands keep at ``chunk_gla``'s level.

When to pick it over ``chunk_gla``: long sequences with few heads, where ``chunk_gla``'s O(T) factor buffers and
per-chunk state buffer cost memory that matters. It is less parallel: ``N * H`` blocks in the backward and ``N * H``
times the value blocks in the forward, each walking its sequence's chunks in order, against ``chunk_gla``'s blocks
per chunk and per value block; with many sequences and heads ``chunk_gla`` is the faster one.

Limits: ``K <= 128`` and ``V <= 128`` (the backward's whole state lives in one block's registers).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.launch import CTYPES, MMA_TYPE, ptr
from ...cuda.loader import register
from ..common.cuda_smem import PAD, SMEM_LIMIT, f32, in_tile, split
from ..common.state_pass_host import PASS_DHT
from .cuda_chunk import forward_outputs, pass_flags, prepare_smem
from .definition import CHUNK_SIZES

if TYPE_CHECKING:
    from .definition import GLAProblem

SOURCE = "gla/fused_chunk.cu"
PADDED = (64, 128)  # KP, and the backward's VP: the key and value dimensions padded
MAX_KV = PADDED[-1]
FWD_VB = (32, 64, 128)  # the forward's value block widths (its VP)


def padded(n: int) -> int:
    """The padded size of a key or value dimension of `n` (at most :data:`MAX_KV`)."""
    return next(x for x in PADDED if x >= n)


def fwd_name(ct: str, bt: int, kp: int, vp: int) -> str:
    return f"gla_fused_chunk_fwd_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {vp}>"


def fwd_value_block(p: GLAProblem, sms: int) -> int:
    """The forward's value block on a device of `sms` SMs: the widest (all of V padded, 64 or 32 columns) whose
    blocks, ``N * H`` times the value blocks, reach half the SMs, else the narrowest. Every value block computes the
    chunk's factors, so wider blocks repeat less of them; narrower ones are what fills the GPU when there are few
    sequences and heads."""
    widths = [w for w in sorted(FWD_VB, reverse=True) if w <= padded(p.V) and (w == 32 or w < 2 * p.V)]
    fits = {x[3] for x in _instantiations() if x[:3] == (CTYPES[p.q.dtype], p.chunk_size, padded(p.K))}
    widths = [w for w in widths if w in fits]
    return next((w for w in widths if p.N * p.H * math.ceil(p.V / w) >= sms // 2), widths[-1])


def operands_smem(ct: str, bt: int, kp: int, vp: int) -> int:
    """``ChunkOperands``: qg, kg (bt x kp), v (bt x vp), the scores (bt x bt), in input precision; the per-key
    decays."""
    return 2 * in_tile(ct, bt * (kp + PAD)) + in_tile(ct, bt * (vp + PAD)) + in_tile(ct, bt * (bt + PAD)) + f32(kp)


def fwd_smem(ct: str, bt: int, kp: int, vp: int) -> int:
    """The forward kernel's dynamic shared memory, as it carves it: the chunk operands, then the larger of the
    factor scratch (prepare's: ``cuda_chunk.prepare_smem``) and the state's split tile, which share their space."""
    return operands_smem(ct, bt, kp, vp) + max(prepare_smem(ct, bt), split(kp * (vp + PAD)))


BWD_TILES = "float"  # the backward's operand tiles: hi + lo split for every input type (fused_chunk.cu: P)


def bwd_names(ct: str, bt: int, kp: int, vp: int) -> tuple[str, str]:
    """The backward's two kernels: phase 1 (dq, forward in time) and phase 2 (dk, dv, dg, dh0, reverse in time)."""
    args = f"<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {vp}, {BWD_TILES}>"
    return f"gla_fused_chunk_bwd_dq_kernel{args}", f"gla_fused_chunk_bwd_dkv_kernel{args}"


BWD_KS = 64  # the key slice of the backward's dq / dk stages (BwdTiles::KS)


def bwd_smem(ct: str, bt: int, kp: int, vp: int) -> int:
    """The backward kernels' dynamic shared memory (both carve ``BwdTiles``): the chunk operands and do in split
    tiles (the scores dA take the scores' tile), then the larger of the factor scratch (its raw q and k in the input
    type) and what overlaps it: the state or its gradient (split), and per key slice G, R, q, k (float), the split
    scratch of the intra-chunk products, the scores' diagonal and the diagonal blocks' flags."""
    slices = (in_tile(BWD_TILES, kp * (vp + PAD)) + 4 * f32(bt * (BWD_KS + 4)) + split(bt * (BWD_KS + PAD))
              + f32(bt) + f32(4))
    return (operands_smem(BWD_TILES, bt, kp, vp) + in_tile(BWD_TILES, bt * (vp + PAD))
            + max(prepare_smem(ct, bt), slices))


def _instantiations(smem: Any = fwd_smem) -> list[tuple[str, int, int, int]]:
    """Every (C type, chunk size, KP, VP) whose kernels (the forward's, or with ``smem=bwd_smem`` the backward's)
    fit :data:`SMEM_LIMIT`."""
    vps = FWD_VB if smem is fwd_smem else PADDED
    return [(ct, bt, kp, vp) for ct in CTYPES.values() for bt in CHUNK_SIZES for kp in PADDED for vp in vps
            if smem(ct, bt, kp, vp) <= SMEM_LIMIT]


register(SOURCE, [fwd_name(*x) for x in _instantiations()]
         + [n for x in _instantiations(bwd_smem) for n in bwd_names(*x)])


def _check_sizes(p: GLAProblem) -> None:
    if p.K > MAX_KV or p.V > MAX_KV:
        raise ValueError(f"fused_chunk_gla's cuda backend takes K, V <= {MAX_KV} (got K={p.K}, V={p.V})")


def _fwd_config(p: GLAProblem, vb: int) -> tuple[str, int, int, int]:
    """The forward's instantiation for value blocks of `vb` columns (every one fits: :func:`_instantiations`)."""
    _check_sizes(p)
    return CTYPES[p.q.dtype], p.chunk_size, padded(p.K), vb


def bwd_config(p: GLAProblem) -> tuple[str, int, int, int]:
    """The backward's instantiation: the call's chunk size, or the largest smaller one whose split tiles fit one
    block's shared memory (16-bit or float inputs at chunk_size=64 with K or V > 64 run chunks of 32). The backward
    recomputes every factor and state itself, so its chunks need not be the forward's: the gradients are those of
    the same function, to rounding."""
    _check_sizes(p)
    fits = _instantiations(bwd_smem)
    ct, kp, vp = CTYPES[p.q.dtype], padded(p.K), padded(p.V)
    return next((ct, bt, kp, vp) for bt in sorted(CHUNK_SIZES, reverse=True)
                if bt <= p.chunk_size and (ct, bt, kp, vp) in fits)


def fused_forward(p: GLAProblem) -> tuple[Any, Any]:
    """Launch the forward: o ``[B, T, H, V]`` (v's dtype) and, with ``p.output_final_state``, the final state
    ``[N, H, K, V]`` float32 (else None)."""
    import cupy

    vb = fwd_value_block(p, cupy.cuda.Device().attributes["MultiProcessorCount"])
    x = _fwd_config(p, vb)
    nvb = math.ceil(p.V / vb)
    o, ht, flags = forward_outputs(p)
    launch.launch(SOURCE, fwd_name(*x), p.N * p.H * nvb, 256, fwd_smem(*x), (
        p.q, p.k, p.v, p.g, ptr(p.initial_state), ptr(p.cu_seqlens), o, ptr(ht), np.int32(p.T), np.int32(p.H),
        np.int32(p.K), np.int32(p.V), np.int32(nvb), np.float32(p.scale), np.int32(flags)))
    return o, ht


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The backend protocol's forward (``rawdelta/ops/common/opdef.py``, ``Backend``): ``((o, ht), None)``; nothing
    is saved."""
    return fused_forward(p), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The backend protocol's backward: the two single-pass kernels (see the module docstring); gradients keyed by
    input name (dq, dk, dv in the input dtype, dg and dh0 float32), None for absent inputs."""
    x = bwd_config(p)
    import cupy

    dt = p.q.dtype
    do = cupy.ascontiguousarray(do if do.dtype == dt else do.astype(dt))
    if dht is not None:
        dht = cupy.ascontiguousarray(dht, dtype=np.float32)
    H, K, V = p.H, p.K, p.V
    flags = pass_flags(p) | (PASS_DHT if dht is not None else 0)
    dq, dk = (empty(cupy, (p.B, p.T, H, K), dt) for _ in range(2))
    dv = empty(cupy, (p.B, p.T, H, V), p.v.dtype)
    dg = empty(cupy, (p.B, p.T, H, K), np.float32)
    dh0 = empty(cupy, p.initial_state.shape, np.float32) if p.initial_state is not None else None
    carry = empty(cupy, (max(p.N, 1), H, K), np.float32)
    dims = (np.int32(p.T), np.int32(H), np.int32(K), np.int32(V), np.float32(p.scale), np.int32(flags))
    dq_kernel, dkv_kernel = bwd_names(*x)
    smem = bwd_smem(*x)
    # phase 1 writes dq and, into dg, q dq without its diagonal terms; phase 2 (same stream) reads dg back
    launch.launch(SOURCE, dq_kernel, p.N * H, 256, smem, (
        p.q, p.k, p.v, p.g, ptr(p.initial_state), do, ptr(dht), ptr(p.cu_seqlens), dq, dg, carry) + dims)
    launch.launch(SOURCE, dkv_kernel, p.N * H, 256, smem, (
        p.q, p.k, p.v, p.g, do, ptr(dht), ptr(p.cu_seqlens), carry, dk, dv, dg, ptr(dh0)) + dims)
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gk": None, "gv": None, "initial_state": dh0}
