"""Host side of the CUDA chunked gated delta rule: picks instantiations, allocates, launches.

Kernels: ``rawdelta/cuda/gated_delta_rule/chunk.cu`` (tensor-core stages; the shared ones live in
``rawdelta/cuda/common``). The gradient finishing (group sums, L2-norm, gate and beta activations)
reuses the recurrent mode's kernels.

Forward: chunk table -> prepare (cumulative log2 gates, beta, the q/k rows' inverse L2 norms, (I + L)^-1
and the masked intra-chunk scores per chunk) -> one state pass per (sequence, value head, BV columns) that
also writes the output. On compute capability 9.0 devices, 16-bit inputs with chunks of 64 take the Hopper
state pass (``gdn_chunk_fwd_wg_kernel``: wgmma warpgroup products, two or four warpgroups per block, optionally
prefetching the next chunk, the q, k, (I + L)^-1 and score tiles as TMA copies through tensor maps encoded here);
everything else, and sm_80, the mma.sync one.
Backward: the same prepare (or the forward's factors), the state pass again storing per-chunk states and
deltas, the reverse state pass (dh per chunk, dv, dh0), the per-chunk dq/dk/gate kernel over key slices,
then the finishing kernels. Where the Hopper forward applies, so do the Hopper reverse pass
(``gdn_chunk_bwd_wg_kernel``) and dq/dk kernel (``gdn_chunk_bwd_dqk_wg_kernel``: persistent, slices of 128
keys, and dq, dk finished in the kernel when there are no grouped value heads).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, empty
from ...cuda import tensor_map
from ...cuda.loader import ProgrammaticLaunch, get_kernel, register, wgmma_available
from . import cuda_recurrent as rec
from .problem import CHUNK_SIZES, GDNProblem

SOURCE = "gated_delta_rule/chunk.cu"
KP_SIZES = (64, 128, 256)  # key dimension padded to one of these
KS = 64  # key slice of the dq/dk kernel
BVB = 64  # value columns per step of the dq/dk kernel's loop over V
PREP_THREADS = 256  # threads per block of the prepare kernel (its NTHREADS template argument)
_MMA_TYPE = {"float": "__nv_bfloat16", "__half": "__half", "__nv_bfloat16": "__nv_bfloat16"}


def _bv(ct: str, kp: int) -> int:
    """Value columns per block of the state passes (float32 at K=256 halves it to fit shared memory)."""
    return 16 if (ct == "float" and kp == 256) else 32


def _prepare_name(ct: str, bt: int, kp: int, ahead: bool = False) -> str:
    return f"gdn_chunk_prepare_kernel<{ct}, {_MMA_TYPE[ct]}, {bt}, {kp}, {PREP_THREADS}, {_cpp_bool(ahead)}>"


def _cpp_bool(x: bool) -> str:
    return "true" if x else "false"


def _fwd_name(ct: str, bt: int, kp: int, store: bool) -> str:
    return f"gdn_chunk_fwd_kernel<{ct}, {_MMA_TYPE[ct]}, {bt}, {kp}, {_bv(ct, kp)}, {_cpp_bool(store)}>"


# Hopper kernels (wgmma): 16-bit inputs, chunks of 64; state-pass value columns per warpgroup by KP.
WG_TYPES = ("__half", "__nv_bfloat16")
WG_BT = 64
USE_WGMMA = True  # tests switch it off to run the mma.sync kernels on a Hopper GPU too
WG4_MIN_FILL = 0.75  # the fraction of SMs four-warpgroup blocks must fill (_wg_config)


def _wg_bvw_options(kp: int) -> tuple[int, ...]:
    return (16,) if kp == 256 else (16, 32)


def _wg_config(p: GDNProblem, kp: int) -> tuple[int, int, bool]:
    """Warpgroups per block, value columns per warpgroup and whether to prefetch, for the Hopper state passes.

    Four warpgroups cover 128 value columns (64 when V <= 64) with one block, so a chunk's q, k and (I + L)^-1
    tiles are read once per head, and shared memory holds two stages: the next chunk loads while this one
    computes. That takes one block per SM; it pays when those blocks fill most SMs (``WG4_MIN_FILL``). Otherwise,
    and at K = 256 (two stages do not fit), two warpgroups: 32 columns each load the tiles once per 64 columns
    instead of 32; 16 doubles the blocks, which pays only when 32 would leave more than half the SMs idle (and
    keeps K = 256 within the registers). Two warpgroups prefetch when the grid has at most one block per SM
    anyway (H100, bf16, docs/benchmarks.md)."""
    sms = _sm_count()
    bvw = 32 if p.V > 64 else 16
    if kp <= 128 and p.N * p.HV * math.ceil(p.V / (4 * bvw)) >= WG4_MIN_FILL * sms:
        return 4, bvw, True
    bvw = 32 if 32 in _wg_bvw_options(kp) and p.N * p.HV * math.ceil(p.V / 64) >= sms / 2 else 16
    return 2, bvw, p.N * p.HV * math.ceil(p.V / (2 * bvw)) <= sms


def _fwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, store: bool, pipe: bool, ahead: bool = False) -> str:
    return (f"gdn_chunk_fwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {_cpp_bool(store)}, {_cpp_bool(pipe)}, "
            f"{_cpp_bool(ahead)}>")


def _bwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, pipe: bool) -> str:
    return f"gdn_chunk_bwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {_cpp_bool(pipe)}>"


def _dqk_wg_name(ct: str, ksw: int, fuse: bool) -> str:
    return f"gdn_chunk_bwd_dqk_wg_kernel<{ct}, {ksw}, {_cpp_bool(fuse)}>"


def _dqk_wg_ksw(K: int) -> int:
    """Keys per warpgroup of the Hopper dq/dk kernel: a slice of 2 KSW keys per item covers K <= 128 at once."""
    return 32 if K <= 64 else 64


def _bwd_state_name(ct: str, bt: int, kp: int) -> str:
    return f"gdn_chunk_bwd_state_kernel<{ct}, {_MMA_TYPE[ct]}, {bt}, {kp}, {_bv(ct, kp)}>"


def _dqk_name(ct: str, bt: int) -> str:
    return f"gdn_chunk_bwd_dqk_kernel<{ct}, {_MMA_TYPE[ct]}, {bt}, {KS}, {BVB}>"


register(
    SOURCE,
    ["gdn_chunk_table_kernel", "gdn_chunk_bwd_gate_rows_kernel"]
    + [f(ct, bt, kp) for ct in rec.CTYPES.values() for bt in CHUNK_SIZES for kp in KP_SIZES
       for f in (_prepare_name, _bwd_state_name)]
    + [_fwd_name(ct, bt, kp, s) for ct in rec.CTYPES.values() for bt in CHUNK_SIZES for kp in KP_SIZES
       for s in (False, True)]
    + [_dqk_name(ct, bt) for ct in rec.CTYPES.values() for bt in CHUNK_SIZES]
    + [_fwd_wg_name(ct, kp, 2, bvw, s, pp) for ct in WG_TYPES for kp in KP_SIZES for bvw in _wg_bvw_options(kp)
       for s in (False, True) for pp in (False, True)]
    + [_fwd_wg_name(ct, kp, 2, bvw, False, True, True) for ct in WG_TYPES for kp in KP_SIZES
       for bvw in _wg_bvw_options(kp)]
    + [_fwd_wg_name(ct, kp, 1, 32, False, True, True) for ct in WG_TYPES for kp in KP_SIZES
       if 32 in _wg_bvw_options(kp)]
    + [_prepare_name(ct, WG_BT, kp, True) for ct in WG_TYPES for kp in KP_SIZES]
    + [_fwd_wg_name(ct, kp, 4, bvw, s, True) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)
       for s in (False, True)]
    + [_bwd_wg_name(ct, kp, 2, bvw, pp) for ct in WG_TYPES for kp in KP_SIZES for bvw in _wg_bvw_options(kp)
       for pp in (False, True)]
    + [_bwd_wg_name(ct, kp, 4, bvw, True) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)]
    + [_dqk_wg_name(ct, ksw, f) for ct in WG_TYPES for ksw in (32, 64) for f in (False, True)],
)


# Shared-memory bytes of each kernel, mirroring the SmemCursor carve-up at the top of each kernel in
# chunk.cu: every buffer is rounded up to 16 bytes; tiles of input precision are 2-byte (split into two
# for float32 inputs), Split tiles are two 2-byte tiles, the rest float32.
_PAD = 8
_ROWS = 7  # ChunkRows: per-chunk row arrays of BT floats


def _r16(nbytes: int) -> int:
    return (nbytes + 15) // 16 * 16


def _in_tile(ct: str, n: int) -> int:
    return _r16(2 * n) * (2 if ct == "float" else 1)


def _split(n: int) -> int:
    return 2 * _r16(2 * n)


def _f32(n: int) -> int:
    return _r16(4 * n)


def _smem_prepare(ct: str, bt: int, kp: int) -> int:
    lda, ldx = bt + 8, bt // 2 + 4  # L, the inverse and its scratch share the q / k tiles' space
    return max(2 * _in_tile(ct, bt * (kp + _PAD)), 2 * _f32(bt * lda) + _f32(bt // 2 * ldx)) + 4 * _f32(bt)


def _smem_fwd(ct: str, bt: int, kp: int, store: bool) -> int:
    bv = _bv(ct, kp)
    ldk, ldv, lda, ldp = kp + _PAD, bv + _PAD, bt + _PAD, bt + _PAD
    tiles = (1 if store else 2) * _in_tile(ct, bt * ldk) + _in_tile(ct, bt * ldv)
    tiles += 0 if store else _in_tile(ct, bt * ldp)
    return tiles + _split(bt * lda) + _split(kp * ldv) + 2 * _split(bt * ldv) + _ROWS * _f32(bt)


def _wg_stage(kp: int, bv: int, q_p: bool, do: bool) -> int:
    """Bytes of one WgStage: the k, v and (I + L)^-1 tiles, q and the scores with ``q_p``, do with ``do``, and
    the raw row scalars."""
    bt = WG_BT
    return 2 * ((2 if q_p else 1) * bt * kp + (2 if do else 1) * bt * bv + (2 if q_p else 1) * bt * bt) + 4 * bt * 4


def _smem_wg(kp: int, bv: int, pipe: bool, q_p: bool, do: bool) -> int:
    """Shared-memory bytes of a Hopper state pass of ``bv`` value columns per block: its stages, the state tile,
    value-sized tiles (two forward; one in the reverse pass, ``do``, which scales do in its stage), the rows, four
    mbarriers and the slack that aligns the stages to 1024 bytes (the TMA tiles' 128-byte swizzle)."""
    tiles = 1 if do else 2
    return ((2 if pipe else 1) * _wg_stage(kp, bv, q_p, do) + 2 * (kp * bv + tiles * WG_BT * bv)
            + _ROWS * _f32(WG_BT) + 32 + 1024)


def _acc_wn(m: int, n: int, nw: int) -> int:
    wm = min(m // 16, nw)
    return min(nw // wm, n // 8)


def _smem_bwd_state(ct: str, bt: int, kp: int) -> int:
    bv = _bv(ct, kp)
    ldk, ldv, lda, ldp = kp + _PAD, bv + _PAD, bt + _PAD, bt + _PAD
    tiles = 2 * _in_tile(ct, bt * ldk) + _in_tile(ct, bt * ldp) + _in_tile(ct, bt * ldv)
    return (tiles + _split(bt * lda) + _split(kp * ldv) + 2 * _split(bt * ldv) + _ROWS * _f32(bt)
            + _f32(_acc_wn(bt, bv, 8) * bt) + _f32(bt))


def _smem_dqk(ct: str, bt: int) -> int:
    ldk, ldv, ldm = KS + _PAD, BVB + _PAD, bt + _PAD
    tiles = 2 * _in_tile(ct, bt * ldk) + 3 * _in_tile(ct, bt * ldv) + 2 * _in_tile(ct, KS * ldv)
    return tiles + 2 * _split(bt * ldm) + _ROWS * _f32(bt) + _f32(8 * bt) + _f32(4 * bt) + _f32(8)


def _smem_dqk_wg(ksw: int) -> int:
    """Shared-memory bytes of the Hopper dq/dk kernel: two slots of an item's q, k and raw rows, two of a V
    step's do, y, delta, h and dh tiles, the float C tile and the row arrays."""
    ks, bt = 2 * ksw, WG_BT
    qk = 2 * bt * ks * 2 + 4 * bt * 4
    vstep = 3 * bt * BVB * 2 + 2 * ks * BVB * 2
    return 2 * qk + 2 * vstep + _f32(bt * (bt + 4)) + _ROWS * _f32(bt) + _f32(12 * bt) + _f32(6 * bt) + _f32(8)


def _configured(name: str, smem: int) -> Any:
    """The kernel, allowed `smem` bytes of dynamic shared memory."""
    kern = get_kernel(SOURCE, name)
    if smem > 48 * 1024 and kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
        # all of the SM's unified L1/shared memory as shared memory, so that two blocks fit where they can
        kern.preferred_shared_memory_carveout = 100
    return kern


def _launch(name: str, grid: int, block: int, smem: int, args: tuple[Any, ...], programmatic: bool = False) -> None:
    """Launch on the current stream; ``programmatic``: the kernel may start beside the stream's previous one
    (``loader.ProgrammaticLaunch``)."""
    _prepared_launch(name, grid, block, smem, args, programmatic)()


def _prepared_launch(name: str, grid: int, block: int, smem: int, args: tuple[Any, ...],
                     programmatic: bool = False) -> Callable[[], None]:
    """:func:`_launch`'s launch, to be called later: a programmatic one has its arguments packed now."""
    if grid <= 0:
        return lambda: None
    kern = _configured(name, smem)
    if programmatic:
        return ProgrammaticLaunch(kern, grid, block, smem, args)
    return functools.partial(kern, (grid,), (block,), args, shared_mem=smem)


@dataclass
class _Chunks:
    """Per-call chunk bookkeeping and the prepare kernel's outputs."""

    bt: int
    kp: int
    ct: str
    nc: int
    wg: bool  # for the Hopper state passes (which take the inverse's hi part only: no Alo)
    seq_chunk0: Any  # int32 [N + 1]
    chunk_bos: Any  # int64 [NC]
    chunk_len: Any  # int32 [NC]
    Gc: Any  # float32 [B*T, HV] cumulative log2 gates
    Bc: Any  # float32 [B*T, HV] effective beta
    Rq: Any  # float32 [B*T, HV] inverse L2 norms of q's rows (None without the in-kernel L2 norm)
    Rk: Any  # float32 [B*T, HV] same for k
    Ahi: Any  # [B*T, HV, BT] (mma type) (I + L)^-1 per chunk, hi part
    Alo: Any  # lo part (None with wg)
    Phi: Any  # [B*T, HV, BT] (mma type) masked, decayed, scaled intra-chunk scores q k^T
    Plo: Any  # their lo part, float32 inputs only (else None)

    @property
    def rows(self) -> tuple[Any, ...]:
        """The per-token row arrays every chunk kernel takes: Gc, Bc, Rq, Rk (null pointers when absent)."""
        return self.Gc, self.Bc, rec._ptr(self.Rq), rec._ptr(self.Rk)

    @property
    def matrices(self) -> tuple[Any, ...]:
        """The per-chunk matrices the state passes take: Ahi, Alo, Phi, Plo (a null pointer when absent)."""
        return self.Ahi, self.Alo, self.Phi, rec._ptr(self.Plo)


def _num_chunks(p: GDNProblem, bt: int) -> int:
    return int(np.sum((p.seq_lengths + bt - 1) // bt))


def _kp(K: int) -> int:
    return next(kp for kp in KP_SIZES if kp >= K)


# The per-chunk factors prepare writes, in the order they sit in a factor workspace (see factor_nbytes): packed
# without gaps, so that every byte of it is written (the matrices come first: each is a multiple of 32 bytes, so
# every array starts 16-byte aligned for the kernels' 16-byte accesses, then the float32 rows).


def _factor_fields(n_tok: int, HV: int, bt: int, ct: str, l2: bool, wg: bool) -> list[tuple[str, tuple[int, ...],
                                                                                          np.dtype]]:
    """(name, shape, dtype) of every factor array :func:`_prepare` fills (the absent ones left out)."""
    f32 = np.dtype(np.float32)
    mma = np.dtype(np.float16) if ct == "__half" else BFLOAT16
    rows, mats = (n_tok, HV), (n_tok, HV, bt)
    fields = [("Ahi", mats, mma)]
    if not wg:
        fields.append(("Alo", mats, mma))
    fields.append(("Phi", mats, mma))
    if ct == "float":
        fields.append(("Plo", mats, mma))
    fields += [("Gc", rows, f32), ("Bc", rows, f32)]
    if l2:
        fields += [("Rq", rows, f32), ("Rk", rows, f32)]
    return fields


def _fields_nbytes(fields: list[tuple[str, tuple[int, ...], np.dtype]]) -> int:
    return sum(math.prod(shape) * dt.itemsize for _, shape, dt in fields)


def _wg_layout(ct: str, bt: int, K: int, V: int, compute_capability: str) -> bool:
    """Whether the Hopper state passes take a call of this type and shape on a device of `compute_capability`
    (``"90"``), before the alignment of its arrays is known (:func:`_wgmma_applies` adds it)."""
    return USE_WGMMA and ct in WG_TYPES and bt == WG_BT and K % 8 == 0 and V % 8 == 0 and compute_capability == "90"


def factor_nbytes(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: Any, chunk_size: int, l2: bool,
                  compute_capability: str | None) -> int:
    """Bytes of a workspace that holds the forward's per-chunk factors for the backward (0: none kept).

    For the framework adapters, which must size the buffer before the call: q ``[B, T, H, K]`` and v
    ``[B, T, HV, V]`` shapes, the input dtype, the chunk size, whether q and k are L2-normalised in the kernel,
    and the device's compute capability as ``"90"`` (None off the GPU, where the backends keep no factors).
    A workspace of the wrong size (the inputs' alignment made the forward take other kernels) is not used:
    the backward then recomputes the factors.
    """
    ct = rec.CTYPES.get(np.dtype(dtype))
    if compute_capability is None or ct is None or chunk_size not in CHUNK_SIZES:
        return 0
    B, T, _, K = q_shape
    HV, V = v_shape[2], v_shape[3]
    return _fields_nbytes(_factor_fields(B * T, HV, chunk_size, ct, l2, _wg_layout(ct, chunk_size, K, V,
                                                                                    compute_capability)))


def _factor_arrays(p: GDNProblem, bt: int, ct: str, wg: bool, workspace: Any) -> dict[str, Any] | None:
    """The factor arrays as views of `workspace` (a 1-D uint8 CuPy array), None when it is not their size;
    fresh arrays when `workspace` is None."""
    import cupy

    fields = _factor_fields(p.B * p.T, p.HV, bt, ct, bool(rec._flags(p) & rec.F_L2), wg)
    if workspace is None:
        return {name: empty(cupy, shape, dt) for name, shape, dt in fields}
    if workspace.dtype != np.uint8 or workspace.ndim != 1 or workspace.nbytes != _fields_nbytes(fields):
        return None
    out, off = {}, 0
    for name, shape, dt in fields:
        nb = math.prod(shape) * dt.itemsize
        out[name] = workspace[off:off + nb].view(dt).reshape(shape)
        off += nb
    return out


def _chunks(p: GDNProblem, bt: int, workspace: Any = None) -> _Chunks | None:
    """The chunk table (launched) and the factor arrays (in `workspace` where it fits, else None; fresh arrays
    without one), not yet filled."""
    import cupy

    ct = rec.CTYPES[p.q.dtype]
    wg = _wgmma_applies(p, bt)
    arrays = _factor_arrays(p, bt, ct, wg, workspace)
    if arrays is None:
        return None
    nc = _num_chunks(p, bt)
    seq_chunk0 = empty(cupy, (p.N + 1,), np.int32)
    chunk_bos = empty(cupy, (max(nc, 1),), np.int64)
    chunk_len = empty(cupy, (max(nc, 1),), np.int32)
    _launch("gdn_chunk_table_kernel", 1, 1024, 0, (
        rec._ptr(p.cu_seqlens), np.int32(p.N), np.int32(p.T), np.int32(bt), seq_chunk0, chunk_bos, chunk_len,
        np.int32(rec._flags(p))))
    return _Chunks(bt, _kp(p.K), ct, nc, wg, seq_chunk0, chunk_bos, chunk_len,
                   *(arrays.get(n) for n in ("Gc", "Bc", "Rq", "Rk", "Ahi", "Alo", "Phi", "Plo")))


def _chunks_for(p: GDNProblem, bt: int, workspace: Any = None) -> _Chunks:
    """:func:`_chunks` into `workspace` where it is their size, else into fresh arrays."""
    ch = _chunks(p, bt, workspace) or _chunks(p, bt)
    assert ch is not None
    return ch


def _launch_prepare(p: GDNProblem, ch: _Chunks, ready: Any = None, grid: int = 0) -> None:
    """The prepare kernel: a block per (chunk, value head), or with ``ready`` (int32 ``[NC * HV]``, zeros)
    ``grid`` persistent blocks that publish each chunk there as they run ahead of the forward pass."""
    max_chunks = 0
    if ready is not None:
        max_chunks = int((p.seq_lengths.max(initial=0) + ch.bt - 1) // ch.bt)
    _launch(_prepare_name(ch.ct, ch.bt, ch.kp, ready is not None), grid if ready is not None else ch.nc * p.HV,
            PREP_THREADS, _smem_prepare(ch.ct, ch.bt, ch.kp), (
                p.q, p.k, rec._ptr(p.g), rec._ptr(p.beta), rec._ptr(p.A_log), rec._ptr(p.dt_bias), ch.chunk_bos,
                ch.chunk_len, ch.Gc, ch.Bc, rec._ptr(ch.Rq), rec._ptr(ch.Rk), ch.Ahi, rec._ptr(ch.Alo), ch.Phi,
                rec._ptr(ch.Plo), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.float32(p.scale),
                np.int32(rec._flags(p)), ch.seq_chunk0, np.int32(p.N), np.int32(max_chunks), rec._ptr(ready)))


def _prepare(p: GDNProblem, bt: int, workspace: Any = None) -> _Chunks:
    """Launch the chunk table and prepare kernels; the factors go into `workspace` where it is their size."""
    ch = _chunks_for(p, bt, workspace)
    _launch_prepare(p, ch)
    return ch


def factors_from_workspace(p: GDNProblem, chunk_size: int, workspace: Any) -> _Chunks | None:
    """The per-chunk factors a forward wrote into `workspace` (:func:`chunk_forward`), for :func:`chunk_backward`;
    None where it holds none (its size is not theirs), and the backward recomputes them."""
    return None if workspace is None else _chunks(p, chunk_size, workspace)


def _state_pass_args(p: GDNProblem, ch: _Chunks) -> tuple[int, int]:
    nvb = math.ceil(p.V / _bv(ch.ct, ch.kp))
    return nvb, p.N * p.HV * nvb


@functools.cache
def _device_props_on(device: int) -> dict[str, Any]:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)


def _device_props() -> dict[str, Any]:
    import cupy

    return _device_props_on(cupy.cuda.runtime.getDevice())


def _sm_count() -> int:
    return int(_device_props()["multiProcessorCount"])


PREPARE_AHEAD = True  # tests switch it off to compare against prepare run before the forward pass
AHEAD_PREPARE_BLOCKS = 2  # prepare blocks per SM beside the forward pass, at most


def _ahead_pass_config(p: GDNProblem, kp: int) -> tuple[int, int] | None:
    """Warpgroups and value columns per warpgroup of the Hopper forward pass beside prepare (AHEAD), None where
    prepare runs before the pass.

    Only where the pass prefetches with one block of two warpgroups per SM (:func:`_wg_config`), so that the SMs
    have room beside it. Two warpgroups of 16 columns become one of 32: the same blocks, each reading a chunk's
    q, k, inverse and score tiles once instead of twice, which leaves the shared-memory pipe to prepare; alone
    that pass is 9% slower, beside prepare the forward is 2-3% faster (H100, docs/benchmarks.md)."""
    nwg, bvw, pipe = _wg_config(p, kp)
    if nwg != 2 or not pipe:
        return None
    return (1, 32) if bvw == 16 and 32 in _wg_bvw_options(kp) else (2, bvw)


def _ahead_grid(p: GDNProblem, ch: _Chunks) -> int:
    """Persistent prepare blocks to run beside the Hopper forward pass (``gdn_chunk_fwd_wg_kernel`` with AHEAD,
    :func:`_ahead_pass_config`), 0 to run prepare before it.

    As many per SM (up to ``AHEAD_PREPARE_BLOCKS``) as fit next to a pass block in shared memory, registers and
    threads: every pass block can then start while all of prepare's run, which the pass's waits on prepare rely
    on (common/ready_flags.cuh)."""
    if not (PREPARE_AHEAD and ch.wg) or ch.nc == 0:
        return 0
    config = _ahead_pass_config(p, ch.kp)
    if config is None:
        return 0
    import cupy

    per_sm = _ahead_blocks_per_sm(ch.ct, ch.kp, *config, AHEAD_PREPARE_BLOCKS, cupy.cuda.runtime.getDevice())
    return min(ch.nc * p.HV, per_sm * _sm_count())


@functools.cache
def _ahead_blocks_per_sm(ct: str, kp: int, nwg: int, bvw: int, most: int, device: int) -> int:
    """Prepare blocks (at most `most`) that fit on an SM beside a block of the AHEAD forward pass (`nwg`
    warpgroups of `bvw` columns and the producer warp); both kernels compiled here, and prepare told to take all
    of the SM's unified memory as shared memory, as the pass does."""
    props = _device_props_on(device)
    reserved = int(props.get("reservedSharedMemPerBlock", 1024))
    pass_dynamic = _smem_wg(kp, nwg * bvw, True, True, False)
    pass_k = _configured(_fwd_wg_name(ct, kp, nwg, bvw, False, True, True), pass_dynamic)
    prep_k = get_kernel(SOURCE, _prepare_name(ct, WG_BT, kp, True))
    prep_k.preferred_shared_memory_carveout = 100

    def regs(kern: Any, threads: int) -> int:
        # on the SM's busiest quarter: each quarter (scheduler) holds a quarter of the register file and a quarter
        # of a block's warps, rounded up (the pass's producer warp is one more); a warp takes 256 at a time
        return -(-threads // 128) * -(-kern.num_regs * 32 // 256) * 256

    pass_threads = nwg * 128 + 32
    pass_smem = pass_dynamic + pass_k.shared_size_bytes + reserved
    prep_smem = _smem_prepare(ct, WG_BT, kp) + prep_k.shared_size_bytes + reserved
    for n in range(most, 0, -1):
        if (pass_smem + n * prep_smem <= int(props["sharedMemPerMultiprocessor"])
                and regs(pass_k, pass_threads) + n * regs(prep_k, PREP_THREADS)
                <= int(props["regsPerMultiprocessor"]) // 4
                and pass_threads + n * PREP_THREADS <= int(props["maxThreadsPerMultiProcessor"])):
            return n
    return 0


def _wgmma_applies(p: GDNProblem, bt: int) -> bool:
    """The Hopper state passes take 16-bit inputs, chunks of 64, K and V multiples of 8 (16-byte rows) and
    16-byte aligned q, k, v (the backward copies a misaligned do), on a compute capability 9.0 device."""
    return (_wg_layout(rec.CTYPES[p.q.dtype], bt, p.K, p.V, "90" if wgmma_available() else "")
            and all(x.data.ptr % 16 == 0 for x in (p.q, p.k, p.v)))


def _pass_maps(p: GDNProblem, ch: _Chunks, bv: int, forward: bool, store: bool = False) -> np.void:
    """The Hopper state passes' TMA maps (kernel parameter ``PassMaps``): q and the scores only without ``store``
    (the forward pass's recompute for the backward), v (boxes of ``bv`` value columns, at most 64) only for the
    ``forward`` passes."""
    n_tok = p.B * p.T

    def qk(x: Any) -> np.ndarray:
        return tensor_map.rows_map(x, n_tok, p.H, p.K)

    def ap(x: Any) -> np.ndarray:
        return tensor_map.rows_map(x, n_tok, p.HV, ch.bt)

    v = tensor_map.rows_map(p.v, n_tok, p.HV, p.V, min(bv, 64)) if forward else None
    return tensor_map.kernel_maps(None if store else qk(p.q), qk(p.k), ap(ch.Ahi), None if store else ap(ch.Phi), v)


def _forward_state_pass(p: GDNProblem, ch: _Chunks, flags: int, o: Any = None, ht: Any = None, hbuf: Any = None,
                        vnew: Any = None) -> None:
    """The forward state pass: the output and final state (o, ht), or with ``hbuf`` the per-chunk states and
    deltas for the backward (hbuf, vnew)."""
    _launch(*_forward_pass_launch(p, ch, flags, o, ht, hbuf, vnew))


def _forward_pass_launch(p: GDNProblem, ch: _Chunks, flags: int, o: Any = None, ht: Any = None, hbuf: Any = None,
                         vnew: Any = None, ready: Any = None) -> tuple[Any, ...]:
    """The arguments of :func:`_launch` for :func:`_forward_state_pass`. With ``ready`` (the Hopper forward only)
    the pass runs beside the prepare kernel launched just before it, waiting on each chunk's flag there
    (:func:`_ahead_grid`)."""
    store = hbuf is not None
    tail = (rec._ptr(p.initial_state), rec._ptr(p.cu_seqlens), ch.seq_chunk0, rec._ptr(o), rec._ptr(ht),
            rec._ptr(hbuf), rec._ptr(vnew), np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K),
            np.int32(p.V))
    if ch.wg:
        ahead = ready is not None  # a producer warp after the warpgroups
        if ahead:
            config = _ahead_pass_config(p, ch.kp)
            assert config is not None, "prepare beside a pass that does not take it (_ahead_grid)"
            (nwg, bvw), pipe = config, True
        else:
            nwg, bvw, pipe = _wg_config(p, ch.kp)
        nvb = math.ceil(p.V / (nwg * bvw))
        return (_fwd_wg_name(ch.ct, ch.kp, nwg, bvw, store, pipe, ahead), p.N * p.HV * nvb,
                128 * nwg + (32 if ahead else 0), _smem_wg(ch.kp, nwg * bvw, pipe, not store, False),
                (*ch.rows, *tail, np.int32(nvb), np.float32(p.scale), np.int32(flags), rec._ptr(ready),
                 _pass_maps(p, ch, nwg * bvw, True, store)), ahead)
    nvb, grid = _state_pass_args(p, ch)
    return (_fwd_name(ch.ct, ch.bt, ch.kp, store), grid, 256, _smem_fwd(ch.ct, ch.bt, ch.kp, store), (
        p.q, p.k, p.v, *ch.rows, *ch.matrices, *tail, np.int32(nvb), np.float32(p.scale), np.int32(flags)), False)


def chunk_forward(p: GDNProblem, chunk_size: int, workspace: Any = None) -> tuple[Any, Any, _Chunks]:
    """Launch the forward: o ``[B, T, HV, V]`` (v's dtype), the final state ``[N, HV, K, V]`` float32, and the
    per-chunk factors (for :func:`chunk_backward`), written into `workspace` (1-D uint8, :func:`factor_nbytes`
    bytes) where it is their size."""
    import cupy

    ch = _chunks_for(p, chunk_size, workspace)
    o = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    flags = rec._flags(p)
    ht = None
    if p.output_final_state:
        ht = empty(cupy, (p.N, p.HV, p.K, p.V), np.float32)
        flags |= rec.F_HT
    grid = _ahead_grid(p, ch)
    ready = empty(cupy, (ch.nc * p.HV,), np.int32) if grid else None
    # with prepare beside the pass, the pass's launch is built (its arguments packed) before prepare's, so that the
    # two launches follow each other closely: while the host is behind the GPU, prepare runs alone until it comes
    state_pass = _prepared_launch(*_forward_pass_launch(p, ch, flags, o=o, ht=ht, ready=ready))
    if ready is not None:
        cupy.cuda.runtime.memsetAsync(ready.data.ptr, 0, ready.nbytes, cupy.cuda.get_current_stream().ptr)
    _launch_prepare(p, ch, ready, grid)
    state_pass()
    return o, ht, ch


def _backward_state_pass(p: GDNProblem, ch: _Chunks, flags: int, do: Any, dht: Any) -> tuple[Any, ...]:
    """The reverse state pass (the Hopper kernel with ``ch.wg``): the state gradient at each chunk's end
    ``dhbuf [NC, HV, K, V]`` and y = A^T d(delta) ``ybuf [B*T, HV, V]`` (q's dtype), dv, dh0 (None without an
    initial state) and the partial row sums y . v ``[partials, B*T, HV]`` float32 of the beta gradient."""
    import cupy

    n_tok = p.B * p.T
    dhbuf = empty(cupy, (max(ch.nc, 1), p.HV, p.K, p.V), p.q.dtype)
    ybuf = empty(cupy, (n_tok, p.HV, p.V), p.q.dtype)
    dv = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    dh0 = empty(cupy, p.initial_state.shape, np.float32) if p.initial_state is not None else None
    out = (rec._ptr(dht), rec._ptr(p.cu_seqlens), ch.seq_chunk0, dhbuf, ybuf, dv)
    sizes = (np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V))
    if ch.wg:
        nwg, bvw, pipe = _wg_config(p, ch.kp)
        nvb = math.ceil(p.V / (nwg * bvw))
        part_yv = empty(cupy, (nwg * nvb, n_tok, p.HV), np.float32)  # one partial per warpgroup
        _launch(_bwd_wg_name(ch.ct, ch.kp, nwg, bvw, pipe), p.N * p.HV * nvb, 128 * nwg,
                _smem_wg(ch.kp, nwg * bvw, pipe, True, True), (
                    p.v, *ch.rows, do, *out, part_yv, rec._ptr(dh0), *sizes, np.int32(nvb), np.int64(n_tok),
                    np.float32(p.scale), np.int32(flags), _pass_maps(p, ch, nwg * bvw, False)))
        return dhbuf, ybuf, dv, dh0, part_yv
    nvb, grid = _state_pass_args(p, ch)
    part_yv = empty(cupy, (nvb, n_tok, p.HV), np.float32)
    _launch(_bwd_state_name(ch.ct, ch.bt, ch.kp), grid, 256, _smem_bwd_state(ch.ct, ch.bt, ch.kp), (
        p.q, p.k, p.v, *ch.rows, *ch.matrices, do, *out, part_yv, rec._ptr(dh0), *sizes, np.int32(nvb),
        np.int64(n_tok), np.float32(p.scale), np.int32(flags)))
    return dhbuf, ybuf, dv, dh0, part_yv


def _dqk_pass(p: GDNProblem, ch: _Chunks, flags: int, do: Any, hbuf: Any, dhbuf: Any, vnew: Any,
              ybuf: Any) -> tuple[Any, ...]:
    """Per chunk and key slice (the Hopper kernel with ``ch.wg``): dq, dk and the partial log-gate and beta
    gradients ``[slices, B*T, HV]`` float32. Returns (dq_hv, dk_hv, part_dG, part_db, qk): the per-value-head
    float32 dq, dk ``[1, B*T, HV, K]`` for :func:`cuda_recurrent.finish_gradients`, or None and
    ``qk = (dq, dk)`` ``[B, T, H, K]`` in q's dtype when the Hopper kernel finished them itself (no grouped value
    heads, K <= 128)."""
    import cupy

    wg = ch.wg
    n_tok = p.B * p.T
    ksw = _dqk_wg_ksw(p.K)
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
        _launch(_dqk_wg_name(ch.ct, ksw, fuse), min(items, _sm_count()), 256, _smem_dqk_wg(ksw), (
            *common, rec._ptr(dq_hv), rec._ptr(dk_hv), *(rec._ptr(x) for x in (qk or (None, None))), part_dG, part_db,
            *tail, np.int32(items), np.int64(n_tok), np.float32(p.scale), np.int32(flags)))
    else:
        _launch(_dqk_name(ch.ct, ch.bt), items, 256, _smem_dqk(ch.ct, ch.bt), (
            *common, dq_hv, dk_hv, part_dG, part_db, *tail, np.int64(n_tok), np.float32(p.scale), np.int32(flags)))
    return dq_hv, dk_hv, part_dG, part_db, qk


def chunk_backward(p: GDNProblem, chunk_size: int, do: Any, dht: Any, factors: _Chunks | None = None) -> dict[str, Any]:
    """Launch the backward; returns gradients keyed by input name (dq, dk, dv in the input dtype, the rest
    float32), None for absent inputs. ``factors``: the forward's per-chunk factors, or None to recompute them."""
    import cupy

    if factors is None:
        ch = _prepare(p, chunk_size)
    else:
        nc = _num_chunks(p, chunk_size)
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
    flags = rec._flags(p) | (rec.F_DHT if dht is not None else 0)
    n_tok = p.B * p.T
    hbuf = empty(cupy, (max(ch.nc, 1), p.HV, p.K, p.V), dt)
    vnew = empty(cupy, (n_tok, p.HV, p.V), dt)
    _forward_state_pass(p, ch, flags, hbuf=hbuf, vnew=vnew)

    dhbuf, ybuf, dv, dh0, part_yv = _backward_state_pass(p, ch, flags, do, dht)
    dq_hv, dk_hv, part_dG, part_db, qk = _dqk_pass(p, ch, flags, do, hbuf, dhbuf, vnew, ybuf)

    dg_tok = empty(cupy, (n_tok, p.HV), np.float32)
    db_tok = empty(cupy, (n_tok, p.HV), np.float32)
    n_el = n_tok * p.HV
    _launch("gdn_chunk_bwd_gate_rows_kernel", math.ceil(n_el / 256), 256, 0, (
        part_dG, part_db, part_yv, dg_tok, db_tok, np.int64(n_el), np.int32(part_dG.shape[0]),
        np.int32(part_yv.shape[0])))

    grads = rec.finish_gradients(p, flags, dq_hv, dk_hv, dg_tok, db_tok, None, nvb=1, qk=qk)
    grads.update({"v": dv, "initial_state": dh0})
    return grads
