"""What the recurrent and chunked Numba backends of the gated delta rule share: the key-dimension limit,
the device scope of a call, and the gradient finishing that runs as array code after their kernels
(the sum over value heads sharing a key head, the L2-norm backward and the in-kernel gate's backward).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ...errors import UnsupportedConfigError
from ..common.numba_launch import numba_device_scope
from .problem import GDNProblem

MAX_K = 256  # size of a thread's state column; a compile-time constant for cuda.local.array


def check_numba_problem(p: GDNProblem) -> None:
    """Raise UnsupportedConfigError for a K the Numba kernels cannot hold (``K > MAX_K``)."""
    if p.K > MAX_K:
        raise UnsupportedConfigError(f"backend='numba' supports K <= {MAX_K} (the state column lives in a local "
                                     f"array), got K={p.K}")


def device_scope(p: GDNProblem) -> contextlib.AbstractContextManager[None]:
    """For CuPy inputs: run on ``p.stream`` and with Numba on the arrays' device."""
    return numba_device_scope(p.xp, p.stream, p.q)


def l2norm_backward(xp: Any, x: Any, dxh: Any) -> Any:
    """Backward of ``x^ = x r``, ``r = 1/sqrt(sum x^2 + 1e-6)`` over the last axis: ``r (dx^ - (dx^ . x^) x^)``."""
    r = 1.0 / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + np.float32(1e-6))
    xh = x * r
    return r * (dxh - xp.sum(dxh * xh, axis=-1, keepdims=True) * xh)


def sum_value_head_groups(x: Any, H: int) -> Any:
    """Sum ``[B, T, HV, K]`` over the value heads sharing a key head: ``[B, T, H, K]``."""
    B, T, HV, K = x.shape
    if HV == H:
        return x
    return x.reshape(B, T, H, HV // H, K).sum(axis=3)


def qk_input_grads(p: GDNProblem, dq: Any, dk: Any) -> tuple[Any, Any]:
    """Gradients w.r.t. the raw q, k ``[B, T, H, K]`` from those w.r.t. the per-value-head rows the kernels
    use, ``[B, T, HV, K]`` (L2-normalised with ``use_qk_l2norm_in_kernel``): summed over each group of value
    heads, then through the L2 norm."""
    dq, dk = sum_value_head_groups(dq, p.H), sum_value_head_groups(dk, p.H)
    if p.use_qk_l2norm_in_kernel:
        f32 = np.float32
        dq = l2norm_backward(p.xp, p.q.astype(f32, copy=False), dq)
        dk = l2norm_backward(p.xp, p.k.astype(f32, copy=False), dk)
    return dq, dk


def gate_input_grads(p: GDNProblem, dg: Any) -> dict[str, Any]:
    """``g`` (and with the gate in kernel ``A_log``, ``dt_bias``) gradients from ``dg`` ``[B, T, HV]``, the
    gradient w.r.t. the log-decay; the in-kernel gate is ``-exp(A_log) * softplus(g_raw + dt_bias)``."""
    if not p.use_gate_in_kernel:
        return {"g": dg}
    xp = p.xp
    f32 = np.float32
    graw = p.g.astype(f32, copy=False)
    x = graw + p.dt_bias.astype(f32, copy=False) if p.dt_bias is not None else graw
    a = xp.exp(p.A_log.astype(f32, copy=False))
    softplus = xp.where(x > 20, x, xp.log1p(xp.exp(xp.minimum(x, f32(20.0)))))
    sigmoid = f32(0.5) * (f32(1.0) + xp.tanh(f32(0.5) * x))
    dg_raw = -a * sigmoid * dg
    grads = {"g": dg_raw, "A_log": (dg * (-a * softplus)).sum(axis=(0, 1))}
    if p.dt_bias is not None:
        grads["dt_bias"] = dg_raw.sum(axis=(0, 1))
    return grads
