"""What the families' input generators share: dtype names, packed sequences and the gate activation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16


def float_dtype(name: Any) -> np.dtype:
    """The NumPy dtype of a dtype name (``"bfloat16"`` / ``"bf16"`` through ml_dtypes)."""
    return BFLOAT16 if str(name) in ("bfloat16", "bf16") else np.dtype(name)


def logsigmoid(x: np.ndarray) -> np.ndarray:
    """``log(sigmoid(x))``: a natural-log decay <= 0."""
    return -np.logaddexp(0.0, -x)


def packed_sequences(B: int, T: int, seqlens: Sequence[int] | None) -> tuple[int, np.ndarray | None, int]:
    """``(T, cu_seqlens, N)`` of a generated call: without `seqlens`, B sequences of T tokens (no cu_seqlens); with
    them, B must be 1 and the sequences are packed along T (their sum), ``cu_seqlens`` int64 ``[N + 1]``."""
    if seqlens is None:
        return T, None, B
    if B != 1:
        raise ValueError("seqlens requires B == 1")
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)
    return int(cu[-1]), cu, len(seqlens)
