"""Array intake, device and stream handling, and the one allocation function.

Every array rawdelta allocates goes through :func:`empty`, so tests can fill it with NaN
(:func:`poison_allocations`) and the torch adapter can route it through torch's allocator
(CuPy's ``using_allocator``). CuPy is imported lazily: ``import rawdelta`` works without it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_poison = False


@functools.cache
def cupy_or_none() -> Any:
    """The cupy module, or None when it is missing or has no usable GPU."""
    try:
        import cupy
    except Exception:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def is_device_array(x: Any) -> bool:
    cp = cupy_or_none()
    return cp is not None and isinstance(x, cp.ndarray)


def as_array(name: str, x: Any) -> Any:
    """Return `x` as a numpy.ndarray (host) or cupy.ndarray (device) without copying.

    Accepts numpy, cupy, and any ``__cuda_array_interface__`` or ``__dlpack__`` producer.
    Raises TypeError naming the argument otherwise.
    """
    if isinstance(x, np.ndarray):
        return x
    cp = cupy_or_none()
    if cp is not None and isinstance(x, cp.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        if cp is None:
            raise TypeError(f"{name} is a CUDA array but CuPy with a GPU is not available")
        return cp.asarray(x)
    if hasattr(x, "__dlpack__"):
        dev = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else _DLPACK_CPU
        if dev == _DLPACK_CUDA:
            if cp is None:
                raise TypeError(f"{name} lives on a CUDA device but CuPy with a GPU is not available")
            return cp.from_dlpack(x)
        if dev in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
            return np.from_dlpack(x)
        raise TypeError(f"{name} lives on an unsupported DLPack device type {dev}")
    raise TypeError(
        f"{name} must be an array (numpy.ndarray, cupy.ndarray, or a __dlpack__ / __cuda_array_interface__ "
        f"producer), got {type(x).__name__}"
    )


def xp_of(x: Any) -> Any:
    """numpy for host arrays, cupy for device arrays."""
    return np if isinstance(x, np.ndarray) else cupy_or_none()


def device_id(x: Any) -> int:
    """-1 for host arrays, else the CUDA device ordinal."""
    return -1 if isinstance(x, np.ndarray) else int(x.device.id)


def empty(xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """Allocate an uninitialised array; NaN-filled while :func:`poison_allocations` is active."""
    return poisoned(xp.empty(shape, dtype=dtype))


def poisoned(x: Any) -> Any:
    """`x`, NaN-filled where it is a float array and :func:`poison_allocations` is active (for views carved out of
    one allocation, which :func:`empty` made as bytes)."""
    if _poison and x.dtype.kind == "f":
        x.fill(np.nan)
    return x


def zeros(xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    out = xp.empty(shape, dtype=dtype)
    out.fill(0)
    return out


def contiguous(x: Any) -> Any:
    """C-contiguous view or copy (documented: non-contiguous inputs are copied)."""
    if x is None or x.flags.c_contiguous:
        return x
    return x.copy(order="C")


@contextlib.contextmanager
def poison_allocations(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer rawdelta allocates with NaN inside this block (tests use it)."""
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


@contextlib.contextmanager
def on_stream(stream: Any) -> Iterator[Any]:
    """Make `stream` CuPy's current stream for the launches inside the block.

    `stream` may be None (CuPy's current stream), a cupy Stream, or a raw ``cudaStream_t`` int.
    """
    import cupy

    if stream is None:
        yield cupy.cuda.get_current_stream()
        return
    if isinstance(stream, int):
        stream = cupy.cuda.ExternalStream(stream)
    with stream:
        yield stream
