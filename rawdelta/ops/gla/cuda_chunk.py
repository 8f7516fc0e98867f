"""The cuda backend of :func:`~rawdelta.chunk_gla`: CUDA C kernels on tensor cores (mma.sync, and wgmma on Hopper).

Forward: the chunk table -> prepare (``rawdelta/cuda/gla/chunk_prepare.cu``: from the per-key cumulative gates,
computed on chip, the operands ``q 2^G`` and ``k 2^(G_last - G)`` with every decay folded in, each chunk's per-key
decay, the intra-chunk scores) -> the common forward state pass with the per-key gate and the plain rule
(``gla/chunk_fwd.cu``), which writes the output and the final state. On compute capability 9.0 devices, 16-bit inputs
with chunks of 64 take the Hopper state passes (wgmma warpgroups, TMA tiles: the gated delta rule's configurations,
:func:`wgmma_applies`); everything else, and sm_80, the mma.sync ones. The forward keeps prepare's outputs for the
backward (as the peer keeps its cumulative gates and scores): the framework adapters in a workspace they allocate
(:func:`workspace_nbytes`; the per-chunk decays, whose size the shapes do not give, are recomputed from g). A
forward whose backward follows (``p.for_backward``, and every forward given a workspace) also keeps each chunk's
start state: the Hopper pass that writes the output stores them as it goes; the mma.sync forward runs the storing
pass after it.
Backward: the forward pass again (storing each chunk's start state) unless the forward kept them, the common
reverse state pass
(``gla/chunk_bwd.cu``: dv, the state gradient at each chunk's end, dh0), then dq, dk and the gate gradient per chunk
and key slice (``gla/chunk_bwd_dqk.cu``, which recomputes the cumulative gates from the gates). Every sum has a fixed
order (no atomics), so the backward is deterministic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import BFLOAT16, empty
from ...cuda import launch, tensor_map
from ...cuda.launch import CTYPES, MMA_TYPE, cpp_bool, ptr
from ...cuda.loader import HOPPER_TARGETS, register, wgmma_available
from ..common.chunk_table import chunk_table_fields, launch_chunk_table, max_chunks
from ..common.cuda_smem import PAD, SM_SMEM, WG_BT, chunk_rows, f32, in_tile, r16, raw_tile, split, wg_pass
from ..common.segments import MAX_SEGMENTS, combine, segment_count, segment_table, segments_allowed
from ..common.state_pass_host import PASS_DHT, PASS_H0, PASS_HT, input_pass_flags
from ..common.state_pass_host import forward_outputs as common_forward_outputs
from ..common.workspace import Field, field_arrays, fields_nbytes
from ..gated_delta_rule.cuda_chunk_hopper import wg_config
from ..gated_delta_rule.cuda_chunk_kernels import (
    WG_TYPES,
    bv,
    kp_for,
    wg_bvw_options,
)
from .cuda_chunk_dqk import launch_dqk
from .definition import CHUNK_SIZES, peer_chunk_size

if TYPE_CHECKING:
    from .definition import GLAProblem

PREPARE = "gla/chunk_prepare.cu"
FWD = "gla/chunk_fwd.cu"
BWD = "gla/chunk_bwd.cu"
KP_SIZES = (64, 128, 256)
PREP_KS = 64  # keys per slice of the prepare kernel

DECAY_KERNEL = "gla_chunk_decay_kernel"


PREP_MIN_BLOCKS = (2, 3)  # prepare's register bounds, in blocks per SM (chunk_prepare.cu: MINB)


def prep_min_blocks(ct: str, bt: int) -> int:
    """Prepare's register bound: 3 blocks per SM where three blocks' shared memory (with the 1 KB static and the 1 KB
    the driver reserves per block) fits an H100 SM (on an A100 the bound is only what fits), else 2 (a tighter
    register bound would only spill)."""
    return 3 if 3 * (prepare_smem(ct, bt) + 2048) <= SM_SMEM else 2


def prepare_name(ct: str, bt: int, minb: int = 0) -> str:
    return f"gla_chunk_prepare_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {minb or prep_min_blocks(ct, bt)}>"


def fwd_name(ct: str, bt: int, kp: int, store: bool) -> str:
    return f"gla_chunk_fwd_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {bv(ct, kp)}, {cpp_bool(store)}>"


def bwd_name(ct: str, bt: int, kp: int) -> str:
    return f"gla_chunk_bwd_state_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {bv(ct, kp)}>"


def fwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, store: bool, pipe: bool, keep: bool = False) -> str:
    return f"gla_chunk_fwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {cpp_bool(store)}, {cpp_bool(pipe)}, {cpp_bool(keep)}>"


def bwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, pipe: bool) -> str:
    return f"gla_chunk_bwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {cpp_bool(pipe)}>"


_CTS = tuple(CTYPES.values())
register(PREPARE, [prepare_name(ct, bt, m) for ct in _CTS for bt in CHUNK_SIZES for m in PREP_MIN_BLOCKS]
         + [DECAY_KERNEL])
register(FWD, [fwd_name(ct, bt, kp, s) for ct in _CTS for bt in CHUNK_SIZES for kp in KP_SIZES for s in (False, True)])
register(BWD, [bwd_name(ct, bt, kp) for ct in _CTS for bt in CHUNK_SIZES for kp in KP_SIZES])
# The Hopper passes (16-bit inputs, chunks of 64) in the configurations wg_config chooses from: two warpgroups of
# 16 or 32 columns (prefetching or not), four prefetching warpgroups at K <= 128.
# Each as the plain output pass, the storing pass and the output pass that keeps the states (STORE, KEEP).
_FWD_MODES = ((False, False), (True, False), (False, True))
register(FWD, [fwd_wg_name(ct, kp, 2, bvw, s, pp, keep) for ct in WG_TYPES for kp in KP_SIZES
               for bvw in wg_bvw_options(kp) for s, keep in _FWD_MODES for pp in (False, True)]
         + [fwd_wg_name(ct, kp, 4, bvw, s, True, keep) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)
            for s, keep in _FWD_MODES], targets=HOPPER_TARGETS)
register(BWD, [bwd_wg_name(ct, kp, 2, bvw, pp) for ct in WG_TYPES for kp in KP_SIZES for bvw in wg_bvw_options(kp)
               for pp in (False, True)]
         + [bwd_wg_name(ct, kp, 4, bvw, True) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)],
         targets=HOPPER_TARGETS)


def prepare_smem(ct: str, bt: int) -> int:
    """Prepare: the raw q and k slices (unpadded), their scaled split copies (padded; the scores take the space of
    both at the end), the gates (float) and reset counts (uint8), the first dead row and the diagonal blocks'
    flags."""
    return (2 * raw_tile(ct, bt * PREP_KS) + 2 * split(bt * (PREP_KS + PAD)) + f32(bt * PREP_KS)
            + r16(bt * PREP_KS) + 2 * f32(4))


def fwd_smem(ct: str, bt: int, kp: int, store: bool) -> int:
    """The forward state pass: q (not with ``store``), k, v, the scores (not with ``store``), the state, the update
    tile, the rows and the per-key decays."""
    ldk, ldv, ldp = kp + PAD, bv(ct, kp) + PAD, bt + PAD
    tiles = (1 if store else 2) * in_tile(ct, bt * ldk) + in_tile(ct, bt * ldv)
    tiles += 0 if store else in_tile(ct, bt * ldp)
    return tiles + split(kp * ldv) + split(bt * ldv) + chunk_rows(bt) + f32(kp)


def bwd_smem(ct: str, bt: int, kp: int) -> int:
    """The reverse state pass: q, k, the scores (split for every input type: the plain rule's REVERSE_P_LO), do, the
    state gradient, dU, the scaled do, the rows and the per-key decays."""
    ldk, ldv, ldp = kp + PAD, bv(ct, kp) + PAD, bt + PAD
    tiles = 2 * in_tile(ct, bt * ldk) + split(bt * ldp) + in_tile(ct, bt * ldv)
    return tiles + split(kp * ldv) + 2 * split(bt * ldv) + chunk_rows(bt) + f32(kp)


def bwd_wg_smem(kp: int, cols: int, pipe: bool) -> int:
    """The Hopper reverse pass of `cols` value columns per block: the common pass with the scores' lo part (the
    plain rule's REVERSE_P_LO) and the per-key decays."""
    return wg_pass(kp, cols, pipe, True, True, has_a=False, key_gate=True, p_lo=True)


def wgmma_applies(p: GLAProblem, bt: int) -> bool:
    """The Hopper state passes take 16-bit inputs, chunks of 64, K and V multiples of 8 (16-byte rows) and a 16-byte
    aligned v, on a compute capability 9.0 device."""
    return (CTYPES[p.q.dtype] in WG_TYPES and bt == WG_BT and p.K % 8 == 0 and p.V % 8 == 0
            and p.v.data.ptr % 16 == 0 and wgmma_available())


def _factor_fields(n_tok: int, H: int, K: int, V: int, bt: int, ct: str, dtype: np.dtype, states: int = 0,
                   scores_lo: bool = True) -> list[Field]:
    """(name, shape, dtype) of what a forward keeps for its backward, in the order they sit in a workspace
    (:func:`workspace_nbytes`): with ``states`` > 0, room for that many chunks' start states first (hbuf, in the
    input dtype, flat and padded to a multiple of 32 elements so that what follows stays 64-byte aligned), then the
    per-token factors prepare writes: the scores (each a multiple of 32 bytes), so qg and kg start 16-byte aligned for
    the passes' TMA tiles, then the row codes. Every factor byte is written by prepare (a deterministic output). Each
    chunk's per-key decay Dk is not among them: its size depends on the chunk count, which the shapes alone do not
    give (hbuf's room is :func:`~..common.chunk_table.max_chunks`' bound). Without ``scores_lo`` the scores' lo part
    (Alo) is left out: only the reverse pass, and the float32 inputs' forward, read it."""
    mma = np.dtype(np.float16) if ct == "__half" else BFLOAT16
    mats = (n_tok, H, bt)
    fields: list[Field] = [("hbuf", (-(-states * H * K * V // 32) * 32,), dtype)] if states else []
    fields += [("Ahi", mats, mma)] + ([("Alo", mats, mma)] if scores_lo else [])
    return fields + [("qg", (n_tok, H, K), dtype), ("kg", (n_tok, H, K), dtype), ("Rc", (n_tok, H), np.dtype(np.int32))]


def workspace_nbytes(shapes: dict[str, tuple[int, ...]], dtype: Any, statics: dict[str, Any],
                     compute_capability: str | None) -> int:
    """The backend protocol's workspace size (``rawdelta/ops/common/opdef.py``): the bytes of prepare's per-token
    factors and of each chunk's start state (hbuf) for q's shape ``[B, T, H, K]``, v's ``[B, T, H, V]`` and
    ``cu_seqlens``' ``[N + 1]`` where given, the input dtype and the chunk size (None: the peer's choice for T); 0 off
    the GPU."""
    ct = CTYPES.get(np.dtype(dtype))
    if compute_capability is None or ct is None:
        return 0
    B, T, H, K = shapes["q"]
    bt = statics.get("chunk_size") or peer_chunk_size(T)
    if bt not in CHUNK_SIZES:
        return 0
    cu = shapes.get("cu_seqlens")
    states = max(max_chunks(B, T, bt, None if cu is None else cu[0] - 1), 1)
    return fields_nbytes(_factor_fields(B * T, H, K, shapes["v"][3], bt, ct, np.dtype(dtype), states))


class _Chunks:
    """The chunk table (launched) and prepare's outputs for one call, not yet filled (layouts:
    ``rawdelta/cuda/gla/chunk.cuh``): the per-token factors as views of `workspace` where it is their size, else
    fresh; ``wg``: the state passes run on Hopper warpgroups. ``ok`` is False when `workspace` was given and is not
    their size (no arrays then). ``hbuf`` ``[NC, H, K, V]`` (input dtype): room for each chunk's start state, in
    `workspace` where given (a workspace always holds it), fresh for ``keep_states``, else None;
    ``states_kept``: a forward filled it. ``Alo``, the scores' lo part, is None without ``scores_lo`` (no backward
    will read it), unless a workspace is given (its layout holds it) or the inputs are float32 (their forward pass
    reads it): a plain 16-bit forward writes 2 bytes per token, head and chunk row less."""

    def __init__(self, p: GLAProblem, bt: int, wgmma: bool = True, workspace: Any = None,
                 keep_states: bool = False, scores_lo: bool = True) -> None:
        self.bt, self.kp, self.ct = bt, kp_for(p.K), CTYPES[p.q.dtype]
        self.segments, self.starts = 1, None  # a segmented forward's segments per sequence and their start states
        self.wg = wgmma and wgmma_applies(p, bt)
        self.nc = p.num_chunks(bt)
        n_tok, H, K, V = p.B * p.T, p.H, p.K, p.V
        states = 0
        if workspace is not None or keep_states:  # fresh: room for the chunks there are; a workspace: the bound
            states = max(self.nc if workspace is None else
                         max_chunks(p.B, p.T, bt, p.N if p.cu_seqlens is not None else None), 1)
        lo = scores_lo or workspace is not None or self.ct == "float"
        fields = _factor_fields(n_tok, H, K, V, bt, self.ct, np.dtype(p.q.dtype), states, lo)
        # the per-call arrays (the chunk count sizes them, so no workspace holds them) join a fresh call's factors
        # in one allocation, or make one allocation of their own beside a workspace
        own = [("Dk", (max(self.nc, 1), H, K), np.dtype(np.float32)), *chunk_table_fields(p.N, self.nc)]
        arrays = field_arrays(fields + own if workspace is None else fields, workspace)
        self.ok = arrays is not None
        self.hbuf, self.states_kept = None, False
        if not self.ok:
            return
        per_call = arrays if workspace is None else field_arrays(own, None)
        self.unused = None  # a workspace's room for states past the call's chunks (prepare zeroes it)
        if states:
            flat = arrays["hbuf"]
            self.hbuf = flat[:states * H * K * V].reshape(states, H, K, V)
            if workspace is not None and flat.size > self.nc * H * K * V:
                self.unused = flat[self.nc * H * K * V:]
        self.Ahi, self.Alo, self.qg, self.kg, self.Rc = (arrays.get(n) for n in ("Ahi", "Alo", "qg", "kg", "Rc"))
        self.Dk = per_call["Dk"]
        self.seq_chunk0, self.chunk_bos, self.chunk_len = launch_chunk_table(
            p.cu_seqlens, p.N, p.T, bt, self.nc, per_call)

    def prepare(self, p: GLAProblem) -> _Chunks:
        """Launch prepare: every factor (and zero a workspace's unused room, so that a forward writes every byte of
        its workspace)."""
        if self.unused is not None:
            self.unused.fill(0)
        if self.nc > 0:
            launch.launch(PREPARE, prepare_name(self.ct, self.bt), self.nc * p.H, 256, prepare_smem(self.ct, self.bt), (
                p.q, p.k, p.g, self.chunk_bos, self.chunk_len, self.Rc, self.qg, self.kg, self.Dk, self.Ahi,
                ptr(self.Alo), np.int32(p.H), np.int32(p.K), np.float32(p.scale)))
        return self

    def decays(self, p: GLAProblem) -> _Chunks:
        """Launch the per-chunk decays Dk alone, from g and the row codes (the factors read back from a workspace,
        which holds no Dk): the values prepare writes."""
        if self.nc > 0:
            launch.launch(PREPARE, DECAY_KERNEL, self.nc * p.H, 128, 0, (
                p.g, self.chunk_bos, self.chunk_len, self.Rc, self.Dk, np.int32(p.H), np.int32(p.K)))
        return self

    def pass_blocks(self, p: GLAProblem) -> tuple[int, int]:
        """Value blocks per head and blocks in all of the mma.sync state passes."""
        nvb = math.ceil(p.V / bv(self.ct, self.kp))
        return nvb, p.N * p.H * nvb

    def wg_config(self, p: GLAProblem) -> tuple[int, int, bool]:
        """Warpgroups per block, value columns per warpgroup and whether to prefetch (the gated delta rule's choice
        for the same sizes)."""
        return wg_config(p.replace(HV=p.H), self.kp)

    def maps(self, p: GLAProblem, cols: int, forward: bool, store: bool = False) -> np.void:
        """The Hopper passes' TMA maps: qg and the scores only without ``store``, kg, v (boxes of `cols` value
        columns, at most 64) for the ``forward`` passes, the scores' lo part for the reverse pass (the plain rule's
        REVERSE_P_LO); no rule matrix."""
        n_tok = p.B * p.T

        def qk(x: Any) -> tensor_map.RowsMap:
            return tensor_map.rows_map(x, n_tok, p.H, p.K)

        def scores(x: Any) -> tensor_map.RowsMap:
            return tensor_map.rows_map(x, n_tok, p.H, self.bt)

        return tensor_map.pass_maps(
            q=None if store else qk(self.qg), k=qk(self.kg), p=None if store else scores(self.Ahi),
            v=tensor_map.rows_map(p.v, n_tok, p.H, p.V, min(cols, 64)) if forward else None,
            plo=None if forward else scores(self.Alo))


def pass_flags(p: GLAProblem) -> int:
    """The pass option bits of a call's inputs (without PASS_HT and PASS_DHT, which depend on the launch)."""
    return input_pass_flags(p.initial_state, p.cu_seqlens)


def forward_outputs(p: GLAProblem) -> tuple[Any, Any, int]:
    """A forward's outputs, allocated: o ``[B, T, H, V]`` (v's dtype), the final state ``[N, H, K, V]`` float32 with
    ``p.output_final_state`` (else None), and the pass flags with PASS_HT where it is written."""
    return common_forward_outputs(p, p.H, pass_flags(p))


def _forward_pass(p: GLAProblem, ch: _Chunks, flags: int, o: Any = None, ht: Any = None, hbuf: Any = None,
                  seq_chunk0: Any = None) -> None:
    """The forward state pass: with ``o`` the output, else (the storing pass) no output; each chunk's start state in
    ``hbuf`` where given (the mma.sync pass that writes ``o`` stores none: see :func:`_keeps_in_pass`); the final
    state in ``ht`` with PASS_HT. ``seq_chunk0``: the sequences' first chunks where they are not the chunk table's (a
    segmented pass's segments)."""
    store = o is None
    seq_chunk0 = ch.seq_chunk0 if seq_chunk0 is None else seq_chunk0
    if ch.wg:
        nwg, bvw, pipe = ch.wg_config(p)
        nvb = math.ceil(p.V / (nwg * bvw))
        keep = not store and hbuf is not None
        launch.launch(FWD, fwd_wg_name(ch.ct, ch.kp, nwg, bvw, store, pipe, keep), p.N * p.H * nvb, 128 * nwg,
                      wg_pass(ch.kp, nwg * bvw, pipe, not store, False, has_a=False, key_gate=True), (
                          ch.Rc, ch.Dk, ptr(p.initial_state), ptr(p.cu_seqlens), seq_chunk0, ptr(o), ptr(ht),
                          ptr(hbuf), np.int32(p.T), np.int32(p.H), np.int32(p.K), np.int32(p.V), np.int32(nvb),
                          np.float32(p.scale), np.int32(flags), ch.maps(p, nwg * bvw, True, store)))
        return
    nvb, grid = ch.pass_blocks(p)
    launch.launch(FWD, fwd_name(ch.ct, ch.bt, ch.kp, store), grid, 256, fwd_smem(ch.ct, ch.bt, ch.kp, store), (
        ch.qg, ch.kg, p.v, ch.Rc, ch.Dk, ch.Ahi, ptr(ch.Alo), ptr(p.initial_state), ptr(p.cu_seqlens), seq_chunk0,
        ptr(o), ptr(ht), ptr(hbuf), np.int32(p.T), np.int32(p.H), np.int32(p.K), np.int32(p.V), np.int32(nvb),
        np.float32(p.scale), np.int32(flags)))


def pass_segments(p: GLAProblem, ch: _Chunks) -> int:
    """Segments per sequence of the forward-direction state passes (:mod:`..common.segments`): where the
    sequences' pass blocks at 64 value columns each leave SMs idle."""
    return segment_count(p.N, p.T, ch.bt, p.cu_seqlens, p.H * math.ceil(p.V / 64), launch.sm_count())


def _segmented_forward(p: GLAProblem, ch: _Chunks, segments: int, o: Any = None, ht: Any = None,
                       hbuf: Any = None, starts: Any = None) -> Any:
    """The forward state pass over `segments` segments per sequence (:mod:`..common.segments`), writing what
    :func:`_forward_pass` writes (o and the final state, and each chunk's start state in ``hbuf`` where given).
    Returns each segment's start state ``[N S, H, K, V]`` float32: `starts` where given (a forward's, for the
    backward's recompute), else from the pass over the segments from zero and the combine."""
    import cupy

    ps = p.replace(B=p.B * segments, T=p.T // segments, N=p.N * segments, initial_state=None)
    seg0 = segment_table(p.N, p.T, ch.bt, segments, ch.nc)
    if starts is None:
        local = empty(cupy, (ps.N, p.H, p.K, p.V), np.float32)
        _forward_pass(ps, ch, PASS_HT, ht=local, seq_chunk0=seg0)
        starts = combine(local, ch.Dk, seg0, p.initial_state, ht, segments)
    _forward_pass(ps.replace(initial_state=starts), ch, PASS_H0, o=o, hbuf=hbuf, seq_chunk0=seg0)
    return starts


def _reverse_pass(p: GLAProblem, ch: _Chunks, flags: int, do: Any, dht: Any, dhbuf: Any, dv: Any, dh0: Any) -> None:
    """The reverse state pass: dv, the state gradient at each chunk's end (dhbuf) and dh0."""
    tail = (ptr(dht), ptr(p.cu_seqlens), ch.seq_chunk0, dhbuf, dv, ptr(dh0), np.int32(p.T), np.int32(p.H),
            np.int32(p.K), np.int32(p.V))
    if ch.wg:
        nwg, bvw, pipe = ch.wg_config(p)
        nvb = math.ceil(p.V / (nwg * bvw))
        launch.launch(BWD, bwd_wg_name(ch.ct, ch.kp, nwg, bvw, pipe), p.N * p.H * nvb, 128 * nwg,
                      bwd_wg_smem(ch.kp, nwg * bvw, pipe), (
                          ch.Rc, ch.Dk, do, *tail, np.int32(nvb), np.float32(p.scale), np.int32(flags),
                          ch.maps(p, nwg * bvw, False)))
        return
    nvb, grid = ch.pass_blocks(p)
    launch.launch(BWD, bwd_name(ch.ct, ch.bt, ch.kp), grid, 256, bwd_smem(ch.ct, ch.bt, ch.kp), (
        ch.qg, ch.kg, do, ch.Rc, ch.Dk, ch.Ahi, ptr(ch.Alo), *tail, np.int32(nvb), np.float32(p.scale),
        np.int32(flags)))


def prepare(p: GLAProblem, chunk_size: int, wgmma: bool = True, workspace: Any = None,
            keep_states: bool = False, scores_lo: bool = True) -> _Chunks:
    """The chunk table and prepare, launched: the factors in `workspace` where it is their size, else fresh (with
    room for the chunks' start states where ``keep_states``; without the scores' lo part where ``scores_lo`` is
    False and nothing else needs it: :class:`_Chunks`)."""
    if p.H * p.K * chunk_size >= 2**31:  # prepare addresses a chunk's rows [BT, H, K] by 32-bit offsets
        raise ValueError(f"chunk_gla's cuda backend takes H * K * chunk_size < 2**31 (got H={p.H}, K={p.K}, "
                         f"chunk_size={chunk_size})")
    ch = _Chunks(p, chunk_size, wgmma, workspace, keep_states, scores_lo)
    return (ch if ch.ok else _Chunks(p, chunk_size, wgmma, None, keep_states, scores_lo)).prepare(p)


def _keeps_in_pass(ch: _Chunks) -> bool:
    """Whether the pass that writes the output stores the chunks' start states as it goes: the Hopper pass does
    (``rawdelta/cuda/common/wg_state_pass.cuh``); the mma.sync one does not, so a forward that keeps them runs the
    storing pass after it."""
    return ch.wg


def chunk_forward(p: GLAProblem, chunk_size: int, wgmma: bool = True, workspace: Any = None,
                  segments: int | None = None) -> tuple[Any, Any, _Chunks]:
    """Launch the forward: o ``[B, T, H, V]`` (v's dtype), with ``p.output_final_state`` the final state
    ``[N, H, K, V]`` float32 (else None), and prepare's factors for the backward (in `workspace` where it is their
    size), with each chunk's start state where ``p.for_backward`` or a workspace is given. ``wgmma=False``: the
    mma.sync passes on a Hopper GPU too. ``segments``: the state pass's segments per sequence (None:
    :func:`pass_segments`' choice; 1: none)."""
    ch = prepare(p, chunk_size, wgmma, workspace, keep_states=p.for_backward, scores_lo=p.for_backward)
    o, ht, flags = forward_outputs(p)
    ch.segments = _segments(p, ch, segments)
    hbuf = ch.hbuf if _keeps_in_pass(ch) else None
    if ch.segments > 1:
        ch.starts = _segmented_forward(p, ch, ch.segments, o=o, ht=ht, hbuf=hbuf)
    else:
        _forward_pass(p, ch, flags, o=o, ht=ht, hbuf=hbuf)
    if ch.hbuf is not None:
        if hbuf is None:  # the storing pass, without the final state (the output pass wrote it)
            _states_pass(p, ch, pass_flags(p), ch.hbuf, ch.segments)
        ch.states_kept = True
    return o, ht, ch


def _states_pass(p: GLAProblem, ch: _Chunks, flags: int, hbuf: Any, segments: int) -> None:
    """The storing pass: each chunk's start state into `hbuf` (from the forward's segments' start states where it
    kept them for that many segments)."""
    if segments > 1:
        _segmented_forward(p, ch, segments, hbuf=hbuf, starts=ch.starts if ch.segments == segments else None)
    else:
        _forward_pass(p, ch, flags, hbuf=hbuf)


def _segments(p: GLAProblem, ch: _Chunks, segments: int | None) -> int:
    """`segments` where given (checked), else :func:`pass_segments`' choice."""
    if segments is None:
        return pass_segments(p, ch)
    if not segments_allowed(p.T, ch.bt, segments, p.cu_seqlens):
        raise ValueError(f"segments: expected 1, or at most {MAX_SEGMENTS} segments of whole chunks of equal-length "
                         f"sequences (T = {p.T}, chunk_size {ch.bt}), got {segments}")
    return segments


def chunk_backward(p: GLAProblem, chunk_size: int, do: Any, dht: Any, wgmma: bool = True,
                   saved: _Chunks | None = None, segments: int | None = None) -> dict[str, Any]:
    """Launch the backward: gradients keyed by input name (dq, dk, dv in the input dtype, dg and dh0 float32),
    None for absent inputs. do ``[B, T, H, V]``; dht ``[N, H, K, V]`` or None; ``saved``: the forward's factors
    and, where it kept them, the chunks' start states (None: prepare and the storing pass run again).
    ``wgmma=False``: the mma.sync passes on a Hopper GPU too. ``segments``: as :func:`chunk_forward`'s."""
    import cupy

    dt = p.q.dtype
    do = cupy.ascontiguousarray(do if do.dtype == dt else do.astype(dt))
    if do.data.ptr % 16:  # the passes load 16-byte rows
        do = do.copy()
    if dht is not None:
        dht = cupy.ascontiguousarray(dht, dtype=np.float32)
    # a plain forward's factors lack Alo, which the reverse pass reads
    usable = saved is not None and saved.bt == chunk_size and saved.Alo is not None
    ch = saved if usable else prepare(p, chunk_size, wgmma)
    ch.wg = wgmma and wgmma_applies(p, chunk_size)
    flags = pass_flags(p) | (PASS_DHT if dht is not None else 0)
    H, K, V = p.H, p.K, p.V
    kept = ch.states_kept  # set only where hbuf holds them
    hbuf = ch.hbuf if kept else empty(cupy, (max(ch.nc, 1), H, K, V), dt)
    dhbuf = empty(cupy, (max(ch.nc, 1), H, K, V), dt)
    dv = empty(cupy, (p.B, p.T, H, V), p.v.dtype)
    dh0 = empty(cupy, p.initial_state.shape, np.float32) if p.initial_state is not None else None
    dq, dk = (empty(cupy, (p.B, p.T, H, K), dt) for _ in range(2))
    dg = empty(cupy, (p.B, p.T, H, K), np.float32)
    if not kept:
        _states_pass(p, ch, flags, hbuf, _segments(p, ch, segments))
    _reverse_pass(p, ch, flags, do, dht, dhbuf, dv, dh0)
    if ch.nc > 0:
        launch_dqk(ch.ct, ch.bt, ch.nc, H, K, V, p.scale, q=p.q, k=p.k, v=p.v, do=do, g=p.g, Rc=ch.Rc,
                   Dk=ch.Dk, hbuf=hbuf, dhbuf=dhbuf, chunk_bos=ch.chunk_bos, chunk_len=ch.chunk_len, dq=dq, dk=dk,
                   dg=dg)
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gk": None, "gv": None, "initial_state": dh0}


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[Any, Any], _Chunks]:
    """The backend protocol's forward (``rawdelta/ops/common/opdef.py``, ``Backend``): ``((o, ht), factors)``, the
    factors for :func:`backward` (in `workspace` where it is their size), so the backward does not run prepare
    again."""
    o, ht, ch = chunk_forward(p, p.chunk_size, workspace=workspace)
    return (o, ht), ch


def backward(p: GLAProblem, saved: _Chunks | None, do: Any, dht: Any) -> dict[str, Any]:
    """The backend protocol's backward: :func:`chunk_backward` with the forward's factors (None recomputes them)."""
    return chunk_backward(p, p.chunk_size, do, dht, saved=saved)


def saved_from_workspace(p: GLAProblem, workspace: Any) -> _Chunks | None:
    """The backend protocol's read-back: the factors and the chunks' start states a forward wrote into `workspace`
    (a forward given a workspace always fills both), with the chunk table and the per-chunk decays launched again
    (the workspace holds neither); None where it is not their size."""
    ch = _Chunks(p, p.chunk_size, True, workspace)
    if not ch.ok:
        return None
    ch.states_kept = True
    return ch.decays(p)
