"""The per-chunk factors of the CUDA chunked gated delta rule: the chunk table, the factor arrays (fresh, or carved
out of a workspace the framework adapters keep for the backward), and the prepare kernel that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import BFLOAT16
from ...cuda import launch
from ...cuda.launch import CTYPES, ptr
from ..common.chunk_table import chunk_table_fields, launch_chunk_table
from ..common.workspace import Field, field_arrays, fields_nbytes
from . import cuda_chunk_smem as smem
from .cuda_chunk_hopper import DEFAULT_OPTIONS, ChunkOptions, wg_layout, wgmma_applies
from .cuda_chunk_kernels import PREP_THREADS, PREPARE_SOURCE, kp_for, prepare_name
from .cuda_common import F_L2, problem_flags
from .definition import CHUNK

if TYPE_CHECKING:
    from .definition import GDNProblem


@dataclass
class ChunkFactors:
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
    Bc: Any  # float32 [B*T, HV] effective beta (0 on a chunk's dead rows)
    Rc: Any  # int32 [B*T, HV] row codes: reset counts and the chunk's first dead row (common/chunk_stages.cuh)
    Rq: Any  # float32 [B*T, HV] inverse L2 norms of q's rows (None without the in-kernel L2 norm)
    Rk: Any  # float32 [B*T, HV] same for k
    Ahi: Any  # [B*T, HV, BT] (mma type) (I + L)^-1 per chunk, hi part
    Alo: Any  # lo part (None with wg)
    Phi: Any  # [B*T, HV, BT] (mma type) masked, decayed, scaled intra-chunk scores q k^T
    Plo: Any  # their lo part, float32 inputs only (else None)

    @property
    def rows(self) -> tuple[Any, ...]:
        """The per-token row arrays every chunk kernel takes: Gc, Bc, Rc, Rq, Rk (null pointers when absent)."""
        return self.Gc, self.Bc, self.Rc, ptr(self.Rq), ptr(self.Rk)

    @property
    def matrices(self) -> tuple[Any, ...]:
        """The per-chunk matrices the state passes take: Ahi, Alo, Phi, Plo (a null pointer when absent)."""
        return self.Ahi, self.Alo, self.Phi, ptr(self.Plo)


# The per-chunk factors prepare writes, in the order they sit in a factor workspace (see factor_nbytes): packed
# without gaps, so that every byte of it is written (the matrices come first: each is a multiple of 32 bytes, so
# every array starts 16-byte aligned for the kernels' 16-byte accesses, then the float32 rows).


def _factor_fields(n_tok: int, HV: int, bt: int, ct: str, l2: bool, wg: bool) -> list[Field]:
    """(name, shape, dtype) of every factor array prepare fills (the absent ones left out)."""
    f32 = np.dtype(np.float32)
    mma = np.dtype(np.float16) if ct == "__half" else BFLOAT16
    rows, mats = (n_tok, HV), (n_tok, HV, bt)
    fields = [("Ahi", mats, mma)]
    if not wg:
        fields.append(("Alo", mats, mma))
    fields.append(("Phi", mats, mma))
    if ct == "float":
        fields.append(("Plo", mats, mma))
    fields += [("Gc", rows, f32), ("Bc", rows, f32), ("Rc", rows, np.dtype(np.int32))]
    if l2:
        fields += [("Rq", rows, f32), ("Rk", rows, f32)]
    return fields


def factor_nbytes(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: Any, chunk_size: int, l2: bool,
                  compute_capability: str | None) -> int:
    """Bytes of a workspace that holds the forward's per-chunk factors for the backward (0: none kept).

    For the framework adapters, which must size the buffer before the call: q ``[B, T, H, K]`` and v
    ``[B, T, HV, V]`` shapes, the input dtype, the chunk size, whether q and k are L2-normalised in the kernel,
    and the device's compute capability as ``"90"`` (None off the GPU, where the backends keep no factors).
    A workspace of the wrong size (the inputs' alignment made the forward take other kernels) is not used:
    the backward then recomputes the factors.
    """
    ct = CTYPES.get(np.dtype(dtype))
    if compute_capability is None or ct is None or chunk_size not in CHUNK.chunk_sizes:
        return 0
    B, T, _, K = q_shape
    HV, V = v_shape[2], v_shape[3]
    return fields_nbytes(_factor_fields(B * T, HV, chunk_size, ct, l2, wg_layout(ct, chunk_size, K, V,
                                                                                   compute_capability)))


def factor_arrays(p: GDNProblem, bt: int, ct: str, wg: bool, workspace: Any) -> dict[str, Any] | None:
    """The factor arrays by name as views of `workspace` (a 1-D uint8 array), None when it is not their size;
    when `workspace` is None, the factors and the chunk table's arrays (:func:`chunk_table_fields`) carved out of one
    fresh allocation. No workspace holds the chunk table: the chunk count, not the shapes alone, sizes it."""
    fields = _factor_fields(p.B * p.T, p.HV, bt, ct, bool(problem_flags(p) & F_L2), wg)
    if workspace is None:
        fields += chunk_table_fields(p.N, p.num_chunks(bt))
    return field_arrays(fields, workspace)


def _chunks(p: GDNProblem, bt: int, workspace: Any, options: ChunkOptions) -> ChunkFactors | None:
    """The chunk table (launched) and the factor arrays (in `workspace` where it fits, else None; fresh arrays
    without one), not yet filled."""
    ct = CTYPES[p.q.dtype]
    wg = wgmma_applies(p, bt, options)
    arrays = factor_arrays(p, bt, ct, wg, workspace)
    if arrays is None:
        return None
    nc = p.num_chunks(bt)
    seq_chunk0, chunk_bos, chunk_len = launch_chunk_table(p.cu_seqlens, p.N, p.T, bt, nc,
                                                          arrays if workspace is None else None)
    return ChunkFactors(bt, kp_for(p.K), ct, nc, wg, seq_chunk0, chunk_bos, chunk_len,
                        *(arrays.get(n) for n in ("Gc", "Bc", "Rc", "Rq", "Rk", "Ahi", "Alo", "Phi", "Plo")))


def chunks_for(p: GDNProblem, bt: int, workspace: Any = None, options: ChunkOptions = DEFAULT_OPTIONS
               ) -> ChunkFactors:
    """The chunk table (launched) and the factor arrays, not yet filled: in `workspace` where it is their size,
    else fresh."""
    ch = _chunks(p, bt, workspace, options) or _chunks(p, bt, None, options)
    assert ch is not None
    return ch


def launch_prepare(p: GDNProblem, ch: ChunkFactors, ready: Any = None, grid: int = 0) -> None:
    """The prepare kernel: a block per (chunk, value head), or with ``ready`` (int32 ``[NC * HV]``, zeros)
    ``grid`` persistent blocks that publish each chunk there as they run ahead of the forward pass."""
    max_chunks = 0
    if ready is not None:
        max_chunks = int((p.seq_lengths.max(initial=0) + ch.bt - 1) // ch.bt)
    launch.launch(PREPARE_SOURCE, prepare_name(ch.ct, ch.bt, ch.kp, ready is not None),
                  grid if ready is not None else ch.nc * p.HV, PREP_THREADS, smem.prepare(ch.ct, ch.bt, ch.kp), (
                      p.q, p.k, ptr(p.g), ptr(p.beta), ptr(p.A_log), ptr(p.dt_bias), ch.chunk_bos, ch.chunk_len,
                      ch.Gc, ch.Bc, ch.Rc, ptr(ch.Rq), ptr(ch.Rk), ch.Ahi, ptr(ch.Alo), ch.Phi, ptr(ch.Plo),
                      np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.float32(p.scale),
                      np.int32(problem_flags(p)), ch.seq_chunk0, np.int32(p.N), np.int32(max_chunks), ptr(ready)))


def prepare(p: GDNProblem, bt: int, workspace: Any = None, options: ChunkOptions = DEFAULT_OPTIONS) -> ChunkFactors:
    """Launch the chunk table and prepare kernels; the factors go into `workspace` where it is their size."""
    ch = chunks_for(p, bt, workspace, options)
    launch_prepare(p, ch)
    return ch


def factors_from_workspace(p: GDNProblem, chunk_size: int, workspace: Any,
                           options: ChunkOptions = DEFAULT_OPTIONS) -> ChunkFactors | None:
    """The per-chunk factors a forward wrote into `workspace` (``cuda_chunk.chunk_forward``), for the backward;
    None where it holds none (its size is not theirs), and the backward then recomputes them."""
    return None if workspace is None else _chunks(p, chunk_size, workspace, options)
