"""JAX entry points: ``rawdelta.jax.<op>`` for every op (see :mod:`rawdelta.adapters.jax`)."""

from rawdelta.adapters import jax as _adapter

globals().update({name: getattr(_adapter, name) for name in _adapter.__all__})
__all__ = list(_adapter.__all__)
