"""What the recurrent and chunked Numba backends of the gated delta rule share: the per-token device functions
of GDN's in-kernel transforms, the device scope of a call, and the gradient finishing that runs as array code
after their kernels (the sum over value heads sharing a key head, the L2-norm backward and the in-kernel gate's
backward).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.backend import numba_cuda
from ..common.numba_device import check_key_dim
from ..common.numba_launch import numba_device_scope

if TYPE_CHECKING:
    from .definition import GDNProblem

# numba.cuda, bound by device_functions(); device functions must reach it as a module global (the reason is in
# ops/common/numba_device.py).
cuda: Any = None


def check_numba_problem(p: GDNProblem) -> None:
    """Raise UnsupportedConfigError for a K the Numba kernels cannot hold (``K > MAX_K``)."""
    check_key_dim(p.K)


@functools.cache
def device_functions() -> Any:
    """Per-token device functions of GDN's in-kernel transforms (compiled lazily, once); returns a namespace:
    ``inv_norm(x, b, t, h, K, on)`` (the reciprocal of the in-kernel L2 norm of ``x[b, t, h]``, x
    ``[B, T, H, K]``) and ``log_decay(g, a_log, dt_bias, b, t, hv, use_gate, has_dt_bias)`` (the scalar log-decay,
    g ``[B, T, HV]``, through the in-kernel gate activation)."""
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    one = f32(1.0)
    zero = f32(0.0)

    @cuda.jit(device=True)
    def inv_norm(x, b, t, h, K, on):
        """``1 / sqrt(sum x^2 + 1e-6)`` of the K-vector ``x[b, t, h]``, or 1 when the option is off."""
        if not on:
            return one
        s = zero
        for i in range(K):
            xi = x[b, t, h, i]
            s += xi * xi
        return one / math.sqrt(s + f32(1e-6))

    @cuda.jit(device=True)
    def log_decay(g, a_log, dt_bias, b, t, hv, use_gate, has_dt_bias):
        """The scalar log-decay g_t, through ``-exp(A_log) * softplus(g + dt_bias)`` with the gate in kernel."""
        x = g[b, t, hv]
        if use_gate:
            if has_dt_bias:
                x = x + dt_bias[hv]
            sp = x if x > f32(20.0) else math.log1p(math.exp(x))
            x = -math.exp(a_log[hv]) * sp
        return x

    return types.SimpleNamespace(inv_norm=inv_norm, log_decay=log_decay)


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
    gradient w.r.t. the log-decay; the in-kernel gate is ``-exp(A_log) * softplus(g_raw + dt_bias)``. Where dg is 0
    so are the terms, even at a token whose gate is non-finite (past a NaN, or a reset)."""
    if not p.use_gate_in_kernel:
        return {"g": dg}
    xp = p.xp
    f32 = np.float32
    graw = p.g.astype(f32, copy=False)
    x = graw + p.dt_bias.astype(f32, copy=False) if p.dt_bias is not None else graw
    a = xp.exp(p.A_log.astype(f32, copy=False))
    softplus = xp.where(x > 20, x, xp.log1p(xp.exp(xp.minimum(x, f32(20.0)))))
    sigmoid = f32(0.5) * (f32(1.0) + xp.tanh(f32(0.5) * x))
    dg_raw = xp.where(dg == 0, f32(0.0), -a * sigmoid * dg)
    grads = {"g": dg_raw, "A_log": xp.where(dg == 0, f32(0.0), dg * (-a * softplus)).sum(axis=(0, 1))}
    if p.dt_bias is not None:
        grads["dt_bias"] = dg_raw.sum(axis=(0, 1))
    return grads
