"""rawdelta: linear-attention kernels (CUDA C via NVRTC, Numba, NumPy) with PyTorch and JAX adapters.

The core API takes NumPy arrays (numpy backend), CuPy arrays (cuda/numba backends) or anything with
``__dlpack__`` / ``__cuda_array_interface__``. Every op ``X`` comes with its raw pair ``X_fwd`` / ``X_bwd``, its
residuals type, its family's gradients NamedTuple and the ``naive_*`` float64 references, all generated from the
op declarations in ``rawdelta/ops/<family>/definition.py`` (listed by :mod:`rawdelta.ops.registry`).
``rawdelta.torch`` and ``rawdelta.jax`` hold the framework adapters (imported lazily, never by the core).
"""

from . import errors
from .ops import registry

__version__ = "0.1.0"

_EXPORTS = registry.exports()
globals().update(_EXPORTS)
__all__ = ["__version__", "errors", *sorted(_EXPORTS)]
