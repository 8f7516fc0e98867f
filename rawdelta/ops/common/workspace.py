"""What a cuda backend's forward keeps for its backward, carved out of one uint8 workspace.

The framework adapters allocate the workspace before the call (its size from the backend's ``workspace_nbytes``,
given the arrays' shapes) and hand it back to the backward; the backend lays out its arrays in it as a list of
fields, ``(name, shape, dtype)`` in order, packed without gaps (the backend orders them so that every array starts at
the alignment its kernels need).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..._arrays import empty

Field = tuple[str, tuple[int, ...], np.dtype]


def fields_nbytes(fields: list[Field]) -> int:
    """Bytes of a workspace that holds `fields`."""
    return sum(math.prod(shape) * dt.itemsize for _, shape, dt in fields)


def field_arrays(fields: list[Field], workspace: Any) -> dict[str, Any] | None:
    """The arrays of `fields` by name: views of `workspace` (a 1-D uint8 array, host or device) in field order, None
    when it is not :func:`fields_nbytes` long; fresh device arrays when `workspace` is None."""
    if workspace is None:
        import cupy

        return {name: empty(cupy, shape, dt) for name, shape, dt in fields}
    if workspace.dtype != np.uint8 or workspace.ndim != 1 or workspace.nbytes != fields_nbytes(fields):
        return None
    out, off = {}, 0
    for name, shape, dt in fields:
        nb = math.prod(shape) * dt.itemsize
        out[name] = workspace[off:off + nb].view(dt).reshape(shape)
        off += nb
    return out
