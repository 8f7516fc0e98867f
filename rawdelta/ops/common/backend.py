"""Backend choice and the single Numba import helper."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from ..._arrays import cupy_or_none
from ...errors import BackendUnavailableError

BACKENDS = ("auto", "cuda", "numba", "numpy")


def resolve_backend(requested: str, on_device: bool) -> str:
    """`auto` is `cuda` for device arrays and `numpy` for host arrays (api.md section 4)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "cuda" if on_device else "numpy"
    return requested


@functools.cache
def numba_cuda() -> Any:
    """Import ``numba.cuda`` (real GPU or the simulator when NUMBA_ENABLE_CUDASIM=1).

    numba-cuda 0.30 still calls ``np.row_stack``, which NumPy 2.5 removed; the alias below keeps
    it importable there (the upstream package is in maintenance mode and will not fix it).
    """
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack  # type: ignore[attr-defined]
    try:
        from numba import cuda
    except Exception as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(f"backend='numba' needs numba-cuda (pip install 'rawdelta[numba]'): {e}") from e
    return cuda


def numba_simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def numba_available() -> bool:
    try:
        cuda = numba_cuda()
    except BackendUnavailableError:
        return False
    return numba_simulator() or bool(cuda.is_available())


def cuda_available() -> bool:
    return cupy_or_none() is not None
