"""The forward of the CUDA chunked gated delta rule: chunk table -> prepare -> one state pass per (sequence, value
head, value columns) that writes the output and the final state; on compute capability 9.0, prepare may run beside
the Hopper pass (:func:`.cuda_chunk_hopper.ahead_grid`). The same pass, storing the per-chunk states and deltas
instead of the output, starts the backward (:func:`state_pass_launch` with ``hbuf``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.launch import ptr
from ..common.state_pass_host import forward_outputs
from . import cuda_chunk_smem as smem
from .cuda_chunk_factors import ChunkFactors, chunks_for, launch_prepare
from .cuda_chunk_hopper import DEFAULT_OPTIONS, ChunkOptions, ahead_grid, ahead_pass_config, pass_maps, wg_config
from .cuda_chunk_kernels import FWD_SOURCE, bv, fwd_name, fwd_wg_name
from .cuda_common import problem_flags

if TYPE_CHECKING:
    from .definition import GDNProblem


def mma_pass_blocks(p: GDNProblem, ch: ChunkFactors) -> tuple[int, int]:
    """Value blocks per head and blocks in all of the mma.sync state passes."""
    nvb = math.ceil(p.V / bv(ch.ct, ch.kp))
    return nvb, p.N * p.HV * nvb


def state_pass_launch(p: GDNProblem, ch: ChunkFactors, flags: int, o: Any = None, ht: Any = None, hbuf: Any = None,
                      vnew: Any = None, ready: Any = None, options: ChunkOptions = DEFAULT_OPTIONS
                      ) -> tuple[Any, ...]:
    """The arguments of ``launch.launch`` for the forward state pass: the output and final state (o, ht), or with
    ``hbuf`` the per-chunk states and deltas for the backward (hbuf, vnew). With ``ready`` (the Hopper forward
    only) the pass runs beside the prepare kernel launched just before it, waiting on each chunk's flag there
    (:func:`.cuda_chunk_hopper.ahead_grid`)."""
    store = hbuf is not None
    tail = (ptr(p.initial_state), ptr(p.cu_seqlens), ch.seq_chunk0, ptr(o), ptr(ht), ptr(hbuf), ptr(vnew),
            np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V))
    if ch.wg:
        ahead = ready is not None  # a producer warp after the warpgroups
        if ahead:
            config = ahead_pass_config(p, ch.kp, options)
            assert config is not None, "prepare beside a pass that does not take it (ahead_grid)"
            (nwg, bvw), pipe = config, True
        else:
            nwg, bvw, pipe = wg_config(p, ch.kp, options)
        nvb = math.ceil(p.V / (nwg * bvw))
        return (FWD_SOURCE, fwd_wg_name(ch.ct, ch.kp, nwg, bvw, store, pipe, ahead), p.N * p.HV * nvb,
                128 * nwg + (32 if ahead else 0), smem.wg_pass(ch.kp, nwg * bvw, pipe, not store, False),
                (*ch.rows, *tail, np.int32(nvb), np.float32(p.scale), np.int32(flags), ptr(ready),
                 pass_maps(p, ch, nwg * bvw, True, store)), ahead)
    nvb, grid = mma_pass_blocks(p, ch)
    return (FWD_SOURCE, fwd_name(ch.ct, ch.bt, ch.kp, store), grid, 256, smem.fwd(ch.ct, ch.bt, ch.kp, store), (
        p.q, p.k, p.v, *ch.rows, *ch.matrices, *tail, np.int32(nvb), np.float32(p.scale), np.int32(flags)), False)


def chunk_forward(p: GDNProblem, chunk_size: int, workspace: Any = None, options: ChunkOptions = DEFAULT_OPTIONS
                  ) -> tuple[Any, Any, ChunkFactors]:
    """Launch the forward: o ``[B, T, HV, V]`` (v's dtype), the final state ``[N, HV, K, V]`` float32, and the
    per-chunk factors (for :func:`.cuda_chunk_bwd.chunk_backward`), written into `workspace` (1-D uint8,
    ``factor_nbytes`` bytes) where it is their size."""
    import cupy

    ch = chunks_for(p, chunk_size, workspace, options)
    o, ht, flags = forward_outputs(p, p.HV, problem_flags(p))
    grid = ahead_grid(p, ch, options)
    ready = empty(cupy, (ch.nc * p.HV,), np.int32) if grid else None
    # with prepare beside the pass, the pass's launch is built (its arguments packed) before prepare's, so that the
    # two launches follow each other closely: while the host is behind the GPU, prepare runs alone until it comes
    state_pass = launch.prepared_launch(*state_pass_launch(p, ch, flags, o=o, ht=ht, ready=ready, options=options))
    if ready is not None:
        cupy.cuda.runtime.memsetAsync(ready.data.ptr, 0, ready.nbytes, cupy.cuda.get_current_stream().ptr)
    launch_prepare(p, ch, ready, grid)
    state_pass()
    return o, ht, ch
