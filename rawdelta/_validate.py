"""One way to validate: bind symbolic dims, collect every reason, raise once (api.md section 6).

Usage::

    v = Validator()
    dims = {"B": 2, "T": 64}
    v.shape("q", q, ("B", "T", "H", "K"), dims)   # binds H and K from q
    v.shape("k", k, ("B", "T", "H", "K"), dims)   # checks against the bound values
    v.raise_if_any()                              # one ValueError listing every problem
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from .errors import UnsupportedConfigError

FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_ACCEPTED_DTYPES = frozenset(np.dtype(n) for n in ("float32", "float16", "float64")) | {np.dtype(ml_dtypes.bfloat16)}


def _fmt_shape(names: Sequence[str], dims: Mapping[str, int]) -> str:
    """``[B, T, H, K] = [2, 64, H, K]``: symbols, then the values bound so far (symbol where unbound)."""
    sym = ", ".join(names)
    if not any(n in dims for n in names):
        return f"[{sym}]"
    return f"[{sym}] = [{', '.join(str(dims[n]) if n in dims else n for n in names)}]"


class Validator:
    """Collects problems with a call's arguments and raises them together."""

    def __init__(self) -> None:
        self.type_errors: list[str] = []
        self.value_errors: list[str] = []
        self.unsupported: list[str] = []

    def type_error(self, msg: str) -> None:
        self.type_errors.append(msg)

    def error(self, msg: str) -> None:
        self.value_errors.append(msg)

    def not_supported(self, msg: str) -> None:
        self.unsupported.append(msg)

    def shape(self, name: str, arr: Any, names: Sequence[str], dims: dict[str, int]) -> bool:
        """Check `arr.shape` against symbolic `names`, binding unbound names into `dims`.

        Returns False (after recording the reason) when the shape does not fit.
        """
        shape = arr.shape
        if len(shape) != len(names):
            self.error(f"{name} must be {len(names)}-D {_fmt_shape(names, dims)}, got shape {tuple(shape)}")
            return False
        new = []
        for n, s in zip(names, shape):  # the hot path: a plain loop, no dims changed unless every size fits
            b = dims.get(n)
            if b is None:
                new.append((n, s))
            elif b != s:
                break
        else:
            dims.update(new)
            return True
        bad = [n for n, s in zip(names, shape) if dims.get(n, s) != s]
        self.error(f"{name} must have shape {_fmt_shape(names, dims)}, got {tuple(shape)} "
                   f"(mismatch in {', '.join(bad)})")
        return False

    def float_dtype(self, name: str, arr: Any) -> None:
        if arr.dtype in _ACCEPTED_DTYPES:  # the hot path: a set lookup, no dtype-name formatting
            return
        dt = np.dtype(arr.dtype).name
        if dt not in FLOAT_DTYPE_NAMES + ("float64",):
            self.error(f"{name} must have a floating dtype in {FLOAT_DTYPE_NAMES} (float64 on the numpy backend), "
                       f"got {dt}")

    def raise_if_any(self) -> None:
        if self.type_errors:
            raise TypeError("; ".join(self.type_errors + self.value_errors))
        if self.value_errors:
            raise ValueError("; ".join(self.value_errors))
        if self.unsupported:
            raise UnsupportedConfigError("; ".join(self.unsupported))
