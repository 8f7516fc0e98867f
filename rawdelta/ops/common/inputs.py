"""What the families' input generators share: dtype names and the gate activation."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._arrays import BFLOAT16


def float_dtype(name: Any) -> np.dtype:
    """The NumPy dtype of a dtype name (``"bfloat16"`` / ``"bf16"`` through ml_dtypes)."""
    return BFLOAT16 if str(name) in ("bfloat16", "bf16") else np.dtype(name)


def logsigmoid(x: np.ndarray) -> np.ndarray:
    """``log(sigmoid(x))``: a natural-log decay <= 0."""
    return -np.logaddexp(0.0, -x)
