"""Gated delta rule (GatedDeltaNet, Qwen3-Next): recurrent mode, references. See README.md for the math."""

from .naive import naive_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule_bwd
from .recurrent import (
    FusedRecurrentGatedDeltaRuleResiduals,
    GatedDeltaRuleGrads,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)

__all__ = [
    "FusedRecurrentGatedDeltaRuleResiduals",
    "GatedDeltaRuleGrads",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_bwd",
    "fused_recurrent_gated_delta_rule_fwd",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule_bwd",
]
