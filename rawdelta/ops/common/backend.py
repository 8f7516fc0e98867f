"""Backend choice, the single Numba import helper, and why a backend cannot run here."""

from __future__ import annotations

import functools
import importlib.util
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


def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a GPU, else why not (shown by ``rawdelta check``, ``info`` and ``bench``)."""
    if cupy_or_none() is not None:
        return None
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'rawdelta[cuda]')"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy sees no CUDA GPU ({type(e).__name__}: {str(e).strip() or 'no detail'})"
    return f"CuPy sees no CUDA GPU (device count {n})"


def numba_status() -> tuple[str | None, str]:
    """``(reason the numba backend cannot run or None, mode)``, mode being ``"GPU"`` or ``"the CUDA simulator"``."""
    mode = "the CUDA simulator" if numba_simulator() else "GPU"
    try:
        cuda = numba_cuda()
    except BackendUnavailableError as e:
        return str(e), mode
    if not numba_simulator() and not cuda.is_available():
        return "numba-cuda sees no CUDA GPU (and NUMBA_ENABLE_CUDASIM is not 1)", mode
    return None, mode


@functools.cache
def numba_unavailable_reason() -> str | None:
    """Why the numba backend cannot run in this process (None when it can); the environment decides it once."""
    return numba_status()[0]
