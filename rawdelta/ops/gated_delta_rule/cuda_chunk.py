"""Host side of the CUDA chunked gated delta rule: its entry points. The work is split by job:

* :mod:`.cuda_chunk_kernels`: the stages' sources (``rawdelta/cuda/gated_delta_rule/chunk_*.cu``), instantiation
  names, registration;
* :mod:`.cuda_chunk_smem`: each kernel's dynamic shared memory;
* :mod:`.cuda_chunk_factors`: the chunk table and the per-chunk factors (fresh, or in the adapters' workspace)
  and the prepare kernel;
* :mod:`.cuda_chunk_hopper`: which calls take the Hopper kernels and their configuration, prepare beside the
  forward pass, TMA maps; :class:`ChunkOptions`;
* :mod:`.cuda_chunk_fwd` and :mod:`.cuda_chunk_bwd`: the forward and backward launches.

Forward: chunk table -> prepare (cumulative log2 gates, beta, the q/k rows' inverse L2 norms, (I + L)^-1 and the
masked intra-chunk scores per chunk) -> one state pass per (sequence, value head, BV columns) that also writes the
output. On compute capability 9.0 devices, 16-bit inputs with chunks of 64 take the Hopper state pass
(``gdn_chunk_fwd_wg_kernel``: wgmma warpgroup products, two or four warpgroups per block, optionally prefetching
the next chunk, the q, k, (I + L)^-1 and score tiles as TMA copies); everything else, and sm_80, the mma.sync one.
Backward: the same prepare (or the forward's factors), the state pass again storing per-chunk states and deltas,
the reverse state pass, the per-chunk dq/dk/gate kernel over key slices, then the finishing kernels shared with the
recurrent mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cuda_chunk_bwd import chunk_backward
from .cuda_chunk_factors import ChunkFactors, factor_nbytes, factors_from_workspace
from .cuda_chunk_fwd import chunk_forward
from .cuda_chunk_hopper import DEFAULT_OPTIONS, ChunkOptions

if TYPE_CHECKING:
    from .definition import GDNProblem

__all__ = ["ChunkFactors", "ChunkOptions", "backward", "chunk_backward", "chunk_forward", "factor_nbytes",
           "factors_from_workspace", "forward", "saved_from_workspace", "workspace_nbytes"]


def forward(p: GDNProblem, workspace: Any = None, options: ChunkOptions = DEFAULT_OPTIONS
            ) -> tuple[tuple[Any, Any], ChunkFactors]:
    """The cuda backend's forward (the backend protocol: ``rawdelta/ops/common/opdef.py``, ``Backend``):
    ``((o, ht), factors)``, the factors for :func:`backward` (in `workspace` where it is their size)."""
    o, ht, factors = chunk_forward(p, p.chunk_size, workspace, options)
    return (o, ht), factors


def backward(p: GDNProblem, saved: ChunkFactors | None, do: Any, dht: Any,
             options: ChunkOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """The cuda backend's backward (the backend protocol): :func:`chunk_backward` with the forward's factors
    (``saved``; None recomputes them)."""
    return chunk_backward(p, p.chunk_size, do, dht, saved, options)


def workspace_nbytes(shapes: dict[str, tuple[int, ...]], dtype: Any, statics: dict[str, Any],
                     compute_capability: str | None) -> int:
    """The backend protocol's workspace size: :func:`factor_nbytes` for the arrays' shapes (by name), the compute
    dtype, the static options (``chunk_size``, ``use_qk_l2norm_in_kernel``) and the device's compute capability."""
    return factor_nbytes(shapes["q"], shapes["v"], dtype, statics["chunk_size"],
                         bool(statics.get("use_qk_l2norm_in_kernel")), compute_capability)


def saved_from_workspace(p: GDNProblem, workspace: Any) -> ChunkFactors | None:
    """The backend protocol's read-back: :func:`factors_from_workspace`."""
    return factors_from_workspace(p, p.chunk_size, workspace)
