"""JAX entry points: ``rawdelta.jax.<op>`` (see :mod:`rawdelta.adapters.jax`)."""

from rawdelta.adapters.jax import fused_recurrent_gated_delta_rule

__all__ = ["fused_recurrent_gated_delta_rule"]
