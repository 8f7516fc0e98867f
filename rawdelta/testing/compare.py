"""One metric and one tolerance table for every comparison against the float64 reference.

Metric: relative RMS error ``||out - ref||_rms / ||ref||_rms`` plus max-abs error relative to
``max|ref|``. NaN or Inf in the output always fails; there is no lenient mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# (input dtype, quantity class) -> relative-RMS bound. The max-abs bound is MAX_ABS_FACTOR times it,
# relative to max|ref|. Classes: "out" (o, final state), "grad" (dq, dk, dv, dh0),
# "gate" (dg, dgk, dgv, dbeta, dA_log, ddt_bias: sums over many terms, so looser).
TOLERANCES: dict[tuple[str, str], float] = {
    ("float64", "out"): 1e-10, ("float64", "grad"): 1e-10, ("float64", "gate"): 1e-9,
    ("float32", "out"): 2e-5, ("float32", "grad"): 5e-5, ("float32", "gate"): 2e-4,
    ("float16", "out"): 3e-3, ("float16", "grad"): 5e-3, ("float16", "gate"): 1e-2,
    ("bfloat16", "out"): 1e-2, ("bfloat16", "grad"): 1.5e-2, ("bfloat16", "gate"): 3e-2,
}
"""Relative-RMS bound per ``(input dtype name, quantity class)``; the classes are ``"out"`` (o, final state),
``"grad"`` (dq, dk, dv, dh0) and ``"gate"`` (dg, dgk, dgv, dbeta, dA_log, ddt_bias)."""
MAX_ABS_FACTOR = 10.0
"""The max-abs error may be at most ``MAX_ABS_FACTOR * bound * max|ref|``."""

_GATE_NAMES = {"g", "gk", "gv", "beta", "A_log", "dt_bias", "dg", "dgk", "dgv", "dbeta", "dA_log", "ddt_bias"}
_OUT_NAMES = {"o", "ht", "final_state"}


def quantity_class(name: str) -> str:
    """The tolerance class of quantity `name` (``"o"``, ``"dq"``, ``"grads.beta"``...): ``"out"``, ``"grad"`` or
    ``"gate"``."""
    base = name.split(".")[-1]
    if base in _OUT_NAMES:
        return "out"
    if base in _GATE_NAMES or base.lstrip("d") in _GATE_NAMES:
        return "gate"
    return "grad"


def tolerance(name: str, dtype: Any) -> float:
    """The relative-RMS bound for quantity `name` computed from inputs of `dtype`."""
    return TOLERANCES[(np.dtype(dtype).name, quantity_class(name))]


def _host(x: Any) -> np.ndarray:
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        return x.get()
    return np.asarray(x)


def _host64(x: Any) -> np.ndarray:
    return np.asarray(_host(x), dtype=np.float64)


def error_stats(ref: Any, out: Any) -> tuple[float, float, float]:
    """``(relative RMS error, max-abs error, max|ref|)`` in float64."""
    r, o = _host64(ref), _host64(out)
    if r.shape != o.shape:
        raise AssertionError(f"shape mismatch: ref {r.shape}, out {o.shape}")
    if not np.all(np.isfinite(o)):
        return float("nan"), float("nan"), float(np.max(np.abs(r))) if r.size else 0.0
    if r.size == 0:
        return 0.0, 0.0, 0.0
    d = o - r
    rms_ref = float(np.sqrt(np.mean(r * r)))
    rel = float(np.sqrt(np.mean(d * d))) / (rms_ref + 1e-30) if rms_ref > 0 else float(np.sqrt(np.mean(d * d)))
    return rel, float(np.max(np.abs(d))), float(np.max(np.abs(r)))


def assert_close(
    name: str, ref: Any, out: Any, ratio: float | None = None, *, dtype: Any = None
) -> tuple[float, float]:
    """Assert `out` matches the reference `ref` by relative RMS and max-abs error.

    Args:
        name: quantity name (``"o"``, ``"dq"``, ``"dg"``...), used in the message and to pick the tolerance class.
        ref: reference values (any array; converted to float64 on the host).
        out: values under test (same shape).
        ratio: relative-RMS bound; default from :data:`TOLERANCES` for ``dtype``.
        dtype: input dtype selecting the tolerance row when `ratio` is not given.

    Fails on any NaN/Inf in `out`. Returns ``(relative RMS error, max-abs error)``.
    """
    if ratio is None:
        if dtype is None:
            raise ValueError("assert_close needs ratio= or dtype=")
        ratio = tolerance(name, dtype)
    rel, max_abs, ref_max = error_stats(ref, out)
    if np.isnan(rel):
        raise AssertionError(f"{name}: output contains NaN or Inf")
    abs_bound = MAX_ABS_FACTOR * ratio * max(ref_max, 1e-30)
    if rel > ratio or (ref_max > 0 and max_abs > abs_bound) or (ref_max == 0 and max_abs > ratio):
        raise AssertionError(
            f"{name}: relative RMS error {rel:.3e} (bound {ratio:.1e}), max-abs error {max_abs:.3e} "
            f"(bound {abs_bound:.3e}, max|ref| {ref_max:.3e})"
        )
    return rel, max_abs


def assert_same_bits(want: Any, got: Any) -> None:
    """Two gradient tuples (an op's ``*_bwd`` result) with the same fields present, equal bit for bit (host or
    device arrays): for results that must not depend on how they were reached (kept or recomputed factors, a
    workspace, a launch configuration)."""
    for name, a, b in zip(want._fields, want, got):
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(_host(a).view(np.uint8), _host(b).view(np.uint8), err_msg=name)
