"""Gated delta rule (GatedDeltaNet, Qwen3-Next): recurrent and chunked modes, references. See README.md for the math."""

from .chunk import (
    ChunkGatedDeltaRuleResiduals,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_bwd,
    chunk_gated_delta_rule_fwd,
)
from .naive import naive_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule_bwd
from .naive_chunk import naive_chunk_gated_delta_rule, naive_chunk_gated_delta_rule_bwd
from .recurrent import (
    FusedRecurrentGatedDeltaRuleResiduals,
    GatedDeltaRuleGrads,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)

__all__ = [
    "ChunkGatedDeltaRuleResiduals",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_bwd",
    "chunk_gated_delta_rule_fwd",
    "FusedRecurrentGatedDeltaRuleResiduals",
    "GatedDeltaRuleGrads",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_bwd",
    "fused_recurrent_gated_delta_rule_fwd",
    "naive_chunk_gated_delta_rule",
    "naive_chunk_gated_delta_rule_bwd",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule_bwd",
]
