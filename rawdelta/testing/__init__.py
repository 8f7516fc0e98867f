"""Shipped test helpers: one ``assert_close``, one tolerance table, the float64 reference, every family's input
generator (``gated_delta_rule_inputs`` ...), NaN poisoning."""

from .._arrays import poison_allocations
from ..ops import registry
from .compare import TOLERANCES, assert_close, assert_same_bits, error_stats, tolerance
from .inputs import split_op_args, to_device, to_host
from .reference import grad_label, reference_results

_GENERATORS = registry.input_generators()
globals().update(_GENERATORS)

__all__ = ["TOLERANCES", "assert_close", "assert_same_bits", "error_stats", "grad_label", "poison_allocations",
           "reference_results", "split_op_args", "to_device", "to_host", "tolerance", *sorted(_GENERATORS)]
