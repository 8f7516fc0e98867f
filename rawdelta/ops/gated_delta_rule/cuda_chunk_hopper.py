"""Where and how the CUDA chunked gated delta rule takes its Hopper kernels (wgmma, sm_90a): which calls they take,
the state passes' configuration (warpgroups per block, value columns per warpgroup, prefetching), prepare beside
the forward pass, and the TMA maps of the passes' tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda import launch, tensor_map
from ...cuda.launch import CTYPES
from ...cuda.loader import get_kernel, wgmma_available
from . import cuda_chunk_smem as smem
from .cuda_chunk_kernels import (
    FWD_SOURCE,
    PREP_THREADS,
    PREPARE_SOURCE,
    WG_BT,
    WG_TYPES,
    fwd_wg_name,
    prepare_name,
    wg_bvw_options,
)

if TYPE_CHECKING:
    from .cuda_chunk_factors import ChunkFactors
    from .definition import GDNProblem

WG4_MIN_FILL = 0.75  # the fraction of SMs four-warpgroup blocks must fill (wg_config)
AHEAD_PREPARE_BLOCKS = 2  # prepare blocks per SM beside the forward pass, at most


@dataclass(frozen=True)
class ChunkOptions:
    """Choices among the CUDA chunked op's kernels that the problem does not make; the defaults are what the op
    runs, the others are for tests and benchmarks (a Hopper GPU can run what sm_80 runs).

    Attributes:
        wgmma: the Hopper state passes wherever they apply (False: the mma.sync ones everywhere).
        prepare_ahead: prepare beside the Hopper forward pass where it fits (False: always before it).
        wg_config: (warpgroups per block, value columns per warpgroup, prefetch) of the Hopper state passes, instead
            of :func:`wg_config`'s choice for the call.
    """

    wgmma: bool = True
    prepare_ahead: bool = True
    wg_config: tuple[int, int, bool] | None = None


DEFAULT_OPTIONS = ChunkOptions()


def wg_layout(ct: str, bt: int, K: int, V: int, compute_capability: str | None,
              options: ChunkOptions = DEFAULT_OPTIONS) -> bool:
    """Whether the Hopper state passes take a call of this type and shape on a device of `compute_capability`
    (``"90"``), before the alignment of its arrays is known (:func:`wgmma_applies` adds it)."""
    return (options.wgmma and ct in WG_TYPES and bt == WG_BT and K % 8 == 0 and V % 8 == 0
            and compute_capability == "90")


def wgmma_applies(p: GDNProblem, bt: int, options: ChunkOptions = DEFAULT_OPTIONS) -> bool:
    """The Hopper state passes take 16-bit inputs, chunks of 64, K and V multiples of 8 (16-byte rows) and
    16-byte aligned q, k, v (the backward copies a misaligned do), on a compute capability 9.0 device."""
    return (wg_layout(CTYPES[p.q.dtype], bt, p.K, p.V, "90" if wgmma_available() else "", options)
            and all(x.data.ptr % 16 == 0 for x in (p.q, p.k, p.v)))


def wg_config(p: GDNProblem, kp: int, options: ChunkOptions = DEFAULT_OPTIONS) -> tuple[int, int, bool]:
    """Warpgroups per block, value columns per warpgroup and whether to prefetch, for the Hopper state passes
    (``options.wg_config`` where given).

    Four warpgroups cover 128 value columns (64 when V <= 64) with one block, so a chunk's q, k and (I + L)^-1
    tiles are read once per head, and shared memory holds two stages: the next chunk loads while this one
    computes. That takes one block per SM; it pays when those blocks fill most SMs (``WG4_MIN_FILL``). Otherwise,
    and at K = 256 (two stages do not fit), two warpgroups: 32 columns each load the tiles once per 64 columns
    instead of 32; 16 doubles the blocks, which pays only when 32 would leave more than half the SMs idle (and
    keeps K = 256 within the registers). Two warpgroups prefetch when the grid has at most one block per SM
    anyway (H100, bf16, docs/benchmarks.md)."""
    if options.wg_config is not None:
        return options.wg_config
    sms = launch.sm_count()
    bvw = 32 if p.V > 64 else 16
    if kp <= 128 and p.N * p.HV * math.ceil(p.V / (4 * bvw)) >= WG4_MIN_FILL * sms:
        return 4, bvw, True
    bvw = 32 if 32 in wg_bvw_options(kp) and p.N * p.HV * math.ceil(p.V / 64) >= sms / 2 else 16
    return 2, bvw, p.N * p.HV * math.ceil(p.V / (2 * bvw)) <= sms


def ahead_pass_config(p: GDNProblem, kp: int, options: ChunkOptions = DEFAULT_OPTIONS) -> tuple[int, int] | None:
    """Warpgroups and value columns per warpgroup of the Hopper forward pass beside prepare (AHEAD), None where
    prepare runs before the pass.

    Only where the pass prefetches with one block of two warpgroups per SM (:func:`wg_config`), so that the SMs
    have room beside it. Two warpgroups of 16 columns become one of 32: the same blocks, each reading a chunk's
    q, k, inverse and score tiles once instead of twice, which leaves the shared-memory pipe to prepare; alone
    that pass is 9% slower, beside prepare the forward is 2-3% faster (H100, docs/benchmarks.md)."""
    nwg, bvw, pipe = wg_config(p, kp, options)
    if nwg != 2 or not pipe:
        return None
    return (1, 32) if bvw == 16 and 32 in wg_bvw_options(kp) else (2, bvw)


def ahead_grid(p: GDNProblem, ch: ChunkFactors, options: ChunkOptions = DEFAULT_OPTIONS) -> int:
    """Persistent prepare blocks to run beside the Hopper forward pass (``gdn_chunk_fwd_wg_kernel`` with AHEAD,
    :func:`ahead_pass_config`), 0 to run prepare before it.

    As many per SM (up to ``AHEAD_PREPARE_BLOCKS``) as fit next to a pass block in shared memory, registers and
    threads: every pass block can then start while all of prepare's run, which the pass's waits on prepare rely
    on (common/ready_flags.cuh)."""
    if not (options.prepare_ahead and ch.wg) or ch.nc == 0:
        return 0
    config = ahead_pass_config(p, ch.kp, options)
    if config is None:
        return 0
    import cupy

    per_sm = _ahead_blocks_per_sm(ch.ct, ch.kp, *config, AHEAD_PREPARE_BLOCKS, cupy.cuda.runtime.getDevice())
    return min(ch.nc * p.HV, per_sm * launch.sm_count())


@functools.cache
def _ahead_blocks_per_sm(ct: str, kp: int, nwg: int, bvw: int, most: int, device: int) -> int:
    """Prepare blocks (at most `most`) that fit on an SM beside a block of the AHEAD forward pass (`nwg`
    warpgroups of `bvw` columns and the producer warp); both kernels compiled here, and prepare told to take all
    of the SM's unified memory as shared memory, as the pass does."""
    props = launch.device_props(device)
    reserved = int(props.get("reservedSharedMemPerBlock", 1024))
    pass_dynamic = smem.wg_pass(kp, nwg * bvw, True, True, False)
    pass_k = launch.configured(FWD_SOURCE, fwd_wg_name(ct, kp, nwg, bvw, False, True, True), pass_dynamic)
    prep_k = get_kernel(PREPARE_SOURCE, prepare_name(ct, WG_BT, kp, True))
    prep_k.preferred_shared_memory_carveout = 100

    def regs(kern: Any, threads: int) -> int:
        # on the SM's busiest quarter: each quarter (scheduler) holds a quarter of the register file and a quarter
        # of a block's warps, rounded up (the pass's producer warp is one more); a warp takes 256 at a time
        return -(-threads // 128) * -(-kern.num_regs * 32 // 256) * 256

    pass_threads = nwg * 128 + 32
    pass_smem = pass_dynamic + pass_k.shared_size_bytes + reserved
    prep_smem = smem.prepare(ct, WG_BT, kp) + prep_k.shared_size_bytes + reserved
    for n in range(most, 0, -1):
        if (pass_smem + n * prep_smem <= int(props["sharedMemPerMultiprocessor"])
                and regs(pass_k, pass_threads) + n * regs(prep_k, PREP_THREADS)
                <= int(props["regsPerMultiprocessor"]) // 4
                and pass_threads + n * PREP_THREADS <= int(props["maxThreadsPerMultiProcessor"])):
            return n
    return 0


def pass_maps(p: GDNProblem, ch: ChunkFactors, cols: int, forward: bool, store: bool = False) -> np.void:
    """The Hopper state passes' TMA maps (kernel parameter ``PassMaps``): q and the scores only without ``store``
    (the forward pass's recompute for the backward), v (boxes of `cols` value columns, at most 64) only for the
    ``forward`` passes."""
    n_tok = p.B * p.T

    def qk(x: Any) -> tensor_map.RowsMap:
        return tensor_map.rows_map(x, n_tok, p.H, p.K)

    def ap(x: Any) -> tensor_map.RowsMap:
        return tensor_map.rows_map(x, n_tok, p.HV, ch.bt)

    v = tensor_map.rows_map(p.v, n_tok, p.HV, p.V, min(cols, 64)) if forward else None
    return tensor_map.pass_maps(q=None if store else qk(p.q), k=qk(p.k), a=ap(ch.Ahi),
                                p=None if store else ap(ch.Phi), v=v)
