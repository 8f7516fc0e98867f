"""Shipped test helpers: one ``assert_close``, one tolerance table, shared input generators, NaN poisoning."""

from .._arrays import poison_allocations
from .compare import TOLERANCES, assert_close, error_stats, tolerance
from .inputs import gated_delta_rule_inputs, to_device, to_host

__all__ = ["TOLERANCES", "assert_close", "error_stats", "gated_delta_rule_inputs", "poison_allocations",
           "to_device", "to_host", "tolerance"]
