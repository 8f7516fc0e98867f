"""What a cuda backend's forward keeps for its backward, carved out of one uint8 workspace.

The framework adapters allocate the workspace before the call (its size from the backend's ``workspace_nbytes``,
given the arrays' shapes) and hand it back to the backward; the backend lays out its arrays in it as a list of
fields, ``(name, shape, dtype)`` in order, packed without gaps (the backend orders them so that every array starts at
the alignment its kernels need).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..._arrays import empty, poisoned

Field = tuple[str, tuple[int, ...], np.dtype]
FRESH_ALIGN = 256  # a fresh allocation's own alignment (CuPy's), so a carved field starts as aligned as a lone one


def fields_nbytes(fields: list[Field]) -> int:
    """Bytes of a workspace that holds `fields`."""
    return sum(math.prod(shape) * dt.itemsize for _, shape, dt in fields)


def field_arrays(fields: list[Field], workspace: Any) -> dict[str, Any] | None:
    """The arrays of `fields` by name: views of `workspace` (a 1-D uint8 array, host or device) in field order, None
    when it is not :func:`fields_nbytes` long; views of one fresh device allocation when `workspace` is None (each
    field at a multiple of :data:`FRESH_ALIGN` bytes: one allocation per call rather than one per field, which is host
    time where every allocation goes through a framework's allocator)."""
    if workspace is None:
        import cupy

        offsets, nbytes = _offsets(tuple(fields), FRESH_ALIGN)
        buf = empty(cupy, (max(nbytes, 1),), np.uint8)
        return {name: poisoned(_view(buf, off, shape, dt)) for (name, shape, dt), off in zip(fields, offsets)}
    if workspace.dtype != np.uint8 or workspace.ndim != 1 or workspace.nbytes != fields_nbytes(fields):
        return None
    offsets, _ = _offsets(tuple(fields), 1)
    return {name: _view(workspace, off, shape, dt) for (name, shape, dt), off in zip(fields, offsets)}


@functools.lru_cache(maxsize=256)
def _offsets(fields: tuple[Field, ...], align: int) -> tuple[tuple[int, ...], int]:
    """Each field's byte offset, packed in order with every offset a multiple of `align`, and the bytes in all (a
    call's layout repeats from call to call: cached)."""
    offsets, off = [], 0
    for _, shape, dt in fields:
        off = -(-off // align) * align
        offsets.append(off)
        off += math.prod(shape) * dt.itemsize
    return tuple(offsets), off


def _view(buf: Any, off: int, shape: tuple[int, ...], dt: np.dtype) -> Any:
    """The C-contiguous `shape` array of `dt` at byte `off` of the uint8 array `buf`: on the device one array made on
    the buffer's memory (a slice, a view and a reshape would make three, each host time per call)."""
    if isinstance(buf, np.ndarray):
        return buf[off:off + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)
    import cupy

    return cupy.ndarray(shape, dt, memptr=buf.data + off)
