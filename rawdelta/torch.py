"""PyTorch entry points: ``rawdelta.torch.<op>`` for every op (see :mod:`rawdelta.adapters.torch`)."""

from rawdelta.adapters import torch as _adapter

globals().update({name: getattr(_adapter, name) for name in _adapter.__all__})
__all__ = list(_adapter.__all__)
