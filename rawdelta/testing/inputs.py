"""Helpers around the families' input generators (which live in each family folder): host/device copies and the
split of a generator's dict into op arguments and cotangents."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_device(inputs: dict[str, Any]) -> dict[str, Any]:
    """Copy every numpy array in `inputs` to the current CuPy device (other values pass through)."""
    import cupy

    return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}


def to_host(x: Any) -> Any:
    """numpy copy of a CuPy array (identity for numpy and None)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.get()


def split_op_args(inputs: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """``(op keyword arguments, do, dht)`` from a generator's dict."""
    kw = {k: v for k, v in inputs.items() if k not in ("do", "dht")}
    return kw, inputs["do"], inputs["dht"]
