"""JAX entry points: ``rawdelta.jax.<op>`` (see :mod:`rawdelta.adapters.jax`)."""

from rawdelta.adapters.jax import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
