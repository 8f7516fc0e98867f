"""rawdelta: linear-attention kernels (CUDA C via NVRTC, Numba, NumPy) with PyTorch and JAX adapters.

The core API takes NumPy arrays (numpy backend), CuPy arrays (cuda/numba backends) or anything with
``__dlpack__`` / ``__cuda_array_interface__``. ``rawdelta.torch`` and ``rawdelta.jax`` hold the
framework adapters (imported lazily, never by the core).
"""

from . import errors
from .ops.gated_delta_rule import (
    ChunkGatedDeltaRuleResiduals,
    FusedRecurrentGatedDeltaRuleResiduals,
    GatedDeltaRuleGrads,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_bwd,
    chunk_gated_delta_rule_fwd,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
    naive_chunk_gated_delta_rule,
    naive_chunk_gated_delta_rule_bwd,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule_bwd,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkGatedDeltaRuleResiduals",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_bwd",
    "chunk_gated_delta_rule_fwd",
    "FusedRecurrentGatedDeltaRuleResiduals",
    "GatedDeltaRuleGrads",
    "__version__",
    "errors",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_bwd",
    "fused_recurrent_gated_delta_rule_fwd",
    "naive_chunk_gated_delta_rule",
    "naive_chunk_gated_delta_rule_bwd",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule_bwd",
]
