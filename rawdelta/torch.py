"""PyTorch entry points: ``rawdelta.torch.<op>`` (see :mod:`rawdelta.adapters.torch`)."""

from rawdelta.adapters.torch import fused_recurrent_gated_delta_rule

__all__ = ["fused_recurrent_gated_delta_rule"]
