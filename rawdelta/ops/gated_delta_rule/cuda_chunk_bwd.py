"""The backward of the CUDA chunked gated delta rule: the forward's factors (or prepare again), the forward state
pass again storing per-chunk states and deltas, the reverse state pass (dh per chunk, dv, dh0), the per-chunk
dq/dk/gate kernel over key slices, the gate rows, then the finishing kernels shared with the recurrent mode
(:func:`.cuda_common.finish_gradients`). Where the Hopper forward applies, so do the Hopper reverse pass
(``gdn_chunk_bwd_wg_kernel``) and dq/dk kernel (``gdn_chunk_bwd_dqk_wg_kernel``: persistent, slices of 128 keys,
and dq, dk finished in the kernel when there are no grouped value heads).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.launch import ptr
from . import cuda_chunk_smem as smem
from .cuda_chunk_factors import ChunkFactors, prepare
from .cuda_chunk_fwd import mma_pass_blocks, state_pass_launch
from .cuda_chunk_hopper import DEFAULT_OPTIONS, ChunkOptions, pass_maps, wg_config
from .cuda_chunk_kernels import (
    BWD_SOURCE,
    DQK_SOURCE,
    GATE_ROWS_KERNEL,
    KS,
    bwd_state_name,
    bwd_wg_name,
    dqk_name,
    dqk_wg_ksw,
    dqk_wg_name,
)
from .cuda_common import F_DHT, finish_gradients, problem_flags

if TYPE_CHECKING:
    from .definition import GDNProblem


def _reverse_state_pass(p: GDNProblem, ch: ChunkFactors, flags: int, do: Any, dht: Any, options: ChunkOptions
                        ) -> tuple[Any, ...]:
    """The reverse state pass (the Hopper kernel with ``ch.wg``): the state gradient at each chunk's end
    ``dhbuf [NC, HV, K, V]`` and y = A^T d(delta) ``ybuf [B*T, HV, V]`` (q's dtype), dv, dh0 (None without an
    initial state) and the partial row sums y . v ``[partials, B*T, HV]`` float32 of the beta gradient."""
    import cupy

    n_tok = p.B * p.T
    dhbuf = empty(cupy, (max(ch.nc, 1), p.HV, p.K, p.V), p.q.dtype)
    ybuf = empty(cupy, (n_tok, p.HV, p.V), p.q.dtype)
    dv = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    dh0 = empty(cupy, p.initial_state.shape, np.float32) if p.initial_state is not None else None
    out = (ptr(dht), ptr(p.cu_seqlens), ch.seq_chunk0, dhbuf, ybuf, dv)
    sizes = (np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V))
    if ch.wg:
        nwg, bvw, pipe = wg_config(p, ch.kp, options)
        nvb = math.ceil(p.V / (nwg * bvw))
        part_yv = empty(cupy, (nwg * nvb, n_tok, p.HV), np.float32)  # one partial per warpgroup
        launch.launch(BWD_SOURCE, bwd_wg_name(ch.ct, ch.kp, nwg, bvw, pipe), p.N * p.HV * nvb, 128 * nwg,
                      smem.wg_pass(ch.kp, nwg * bvw, pipe, True, True), (
                          p.v, *ch.rows, do, *out, part_yv, ptr(dh0), *sizes, np.int32(nvb), np.int64(n_tok),
                          np.float32(p.scale), np.int32(flags), pass_maps(p, ch, nwg * bvw, False)))
        return dhbuf, ybuf, dv, dh0, part_yv
    nvb, grid = mma_pass_blocks(p, ch)
    part_yv = empty(cupy, (nvb, n_tok, p.HV), np.float32)
    launch.launch(BWD_SOURCE, bwd_state_name(ch.ct, ch.bt, ch.kp), grid, 256, smem.bwd_state(ch.ct, ch.bt, ch.kp), (
        p.q, p.k, p.v, *ch.rows, *ch.matrices, do, *out, part_yv, ptr(dh0), *sizes, np.int32(nvb), np.int64(n_tok),
        np.float32(p.scale), np.int32(flags)))
    return dhbuf, ybuf, dv, dh0, part_yv


def _dqk_pass(p: GDNProblem, ch: ChunkFactors, flags: int, do: Any, hbuf: Any, dhbuf: Any, vnew: Any,
              ybuf: Any) -> tuple[Any, ...]:
    """Per chunk and key slice (the Hopper kernel with ``ch.wg``): dq, dk and the partial log-gate and beta
    gradients ``[slices, B*T, HV]`` float32. Returns (dq_hv, dk_hv, part_dG, part_db, qk): the per-value-head
    float32 dq, dk ``[1, B*T, HV, K]`` for :func:`.cuda_common.finish_gradients`, or None and ``qk = (dq, dk)``
    ``[B, T, H, K]`` in q's dtype when the Hopper kernel finished them itself (no grouped value heads, K <= 128)."""
    import cupy

    wg = ch.wg
    n_tok = p.B * p.T
    ksw = dqk_wg_ksw(p.K)
    nks = math.ceil(p.K / (2 * ksw if wg else KS))
    part_dG = empty(cupy, (nks, n_tok, p.HV), np.float32)
    part_db = empty(cupy, (nks, n_tok, p.HV), np.float32)
    fuse = wg and p.HV == p.H and nks == 1
    dq_hv = None if fuse else empty(cupy, (1, n_tok, p.HV, p.K), np.float32)
    dk_hv = None if fuse else empty(cupy, (1, n_tok, p.HV, p.K), np.float32)
    qk = (empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype), empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype)) if fuse else None
    common = (p.q, p.k, do, *ch.rows, hbuf, dhbuf, vnew, ybuf, ch.chunk_bos, ch.chunk_len)
    tail = (np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V), np.int32(nks))
    items = ch.nc * p.HV * nks
    if wg:  # persistent: one block per SM walks the items
        launch.launch(DQK_SOURCE, dqk_wg_name(ch.ct, ksw, fuse), min(items, launch.sm_count()), 256,
                      smem.dqk_wg(ksw), (
                          *common, ptr(dq_hv), ptr(dk_hv), *(ptr(x) for x in (qk or (None, None))), part_dG,
                          part_db, *tail, np.int32(items), np.int64(n_tok), np.float32(p.scale), np.int32(flags)))
    else:
        launch.launch(DQK_SOURCE, dqk_name(ch.ct, ch.bt), items, 256, smem.dqk(ch.ct, ch.bt), (
            *common, dq_hv, dk_hv, part_dG, part_db, *tail, np.int64(n_tok), np.float32(p.scale), np.int32(flags)))
    return dq_hv, dk_hv, part_dG, part_db, qk


def chunk_backward(p: GDNProblem, chunk_size: int, do: Any, dht: Any, factors: ChunkFactors | None = None,
                   options: ChunkOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """Launch the backward; returns gradients keyed by input name (dq, dk, dv in the input dtype, the rest
    float32), None for absent inputs. ``factors``: the forward's per-chunk factors, or None to recompute them.
    do ``[B, T, HV, V]``; dht ``[N, HV, K, V]`` or None."""
    import cupy

    if factors is None:
        ch = prepare(p, chunk_size, options=options)
    else:
        nc = p.num_chunks(chunk_size)
        if (factors.bt, factors.nc) != (chunk_size, nc):
            raise ValueError(f"factors: expected the per-chunk factors of this call (chunk_size {chunk_size}, "
                             f"{nc} chunks), got chunk_size {factors.bt}, {factors.nc} chunks")
        ch = factors
    dt = p.q.dtype
    do = do if do.dtype == dt else do.astype(dt)
    if ch.wg and do.data.ptr % 16:  # the Hopper kernels load 16-byte rows
        do = do.copy()
    if dht is not None and dht.dtype != np.float32:
        dht = dht.astype(np.float32)
    flags = problem_flags(p) | (F_DHT if dht is not None else 0)
    n_tok = p.B * p.T
    hbuf = empty(cupy, (max(ch.nc, 1), p.HV, p.K, p.V), dt)
    vnew = empty(cupy, (n_tok, p.HV, p.V), dt)
    launch.launch(*state_pass_launch(p, ch, flags, hbuf=hbuf, vnew=vnew, options=options))

    dhbuf, ybuf, dv, dh0, part_yv = _reverse_state_pass(p, ch, flags, do, dht, options)
    dq_hv, dk_hv, part_dG, part_db, qk = _dqk_pass(p, ch, flags, do, hbuf, dhbuf, vnew, ybuf)

    dg_tok = empty(cupy, (n_tok, p.HV), np.float32)
    db_tok = empty(cupy, (n_tok, p.HV), np.float32)
    n_el = n_tok * p.HV
    launch.launch(DQK_SOURCE, GATE_ROWS_KERNEL, math.ceil(n_el / 256), 256, 0, (
        part_dG, part_db, part_yv, dg_tok, db_tok, np.int64(n_el), np.int32(part_dG.shape[0]),
        np.int32(part_yv.shape[0])))

    grads = finish_gradients(p, flags, dq_hv, dk_hv, dg_tok, db_tok, None, nvb=1, qk=qk)
    grads.update({"v": dv, "initial_state": dh0})
    return grads
