"""PyTorch entry points: ``rawdelta.torch.<op>`` (see :mod:`rawdelta.adapters.torch`)."""

from rawdelta.adapters.torch import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
