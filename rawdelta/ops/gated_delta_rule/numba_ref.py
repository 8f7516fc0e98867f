"""The ``numba`` backend of the recurrent gated delta rule: readable Numba CUDA reference kernels.

One thread owns one column ``j`` of the state of one sequence ``n`` and value head ``hv`` and walks
the tokens in order, keeping ``S[:, j]`` (``K <= 256``) in a local array. Columns are independent in
the recurrence (README.md), so no thread ever talks to another. Arithmetic is float32 throughout,
without tensor cores; the kernels favour clarity over speed.

Passes:

* forward: :func:`recurrent_forward` launches the forward kernel once.
* backward: the forward kernel runs again and stores the state before every token
  (``[B, T, HV, K, V]``, so memory grows with T), then the backward kernel walks each column in
  reverse. Per-column contributions to row quantities (dq, dk, dgk, the scalar dg and dbeta) go to
  buffers with a trailing column axis and are summed afterwards (deterministic, no atomics), then
  summed over the value heads sharing a key head; the L2-norm and gate epilogues run as array code.

Works on numpy arrays (copied to the device, or to the Numba CUDA simulator with
``NUMBA_ENABLE_CUDASIM=1``) and on CuPy device arrays (zero-copy, launched on CuPy's current stream
or ``p.stream``). Results come back in the array library of ``p.q``.
"""

from __future__ import annotations

import functools
import math
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.backend import numba_cuda
from ..common.numba_device import MAX_K, device_helpers
from ..common.numba_launch import NumbaLauncher
from .numba_common import check_numba_problem, device_functions, device_scope, gate_input_grads, qk_input_grads

if TYPE_CHECKING:
    from .definition import GDNProblem

# numba.cuda, bound by _kernels(). Kernels must reach it as a module global (the reason is in
# ops/common/numba_device.py).
cuda: Any = None


@functools.cache
def _kernels() -> Any:
    """Compile (lazily, once) the device functions and the two kernels; returns a namespace."""
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    one = f32(1.0)
    zero = f32(0.0)

    dev = device_functions()
    inv_norm, log_decay = dev.inv_norm, dev.log_decay
    helpers = device_helpers()
    column_thread, seq_bounds = helpers.column_thread, helpers.seq_bounds
    load_column, store_column = helpers.load_column, helpers.store_column

    @cuda.jit(device=True)
    def column_decay(g, gv, a_log, dt_bias, b, t, hv, j, has_g, has_gv, use_gate, has_dt_bias):
        """``exp(g_t) * exp(gv_t[j])``: the part of the decay shared by the whole column j."""
        d = one
        if has_g:
            d = math.exp(log_decay(g, a_log, dt_bias, b, t, hv, use_gate, has_dt_bias))
        if has_gv:
            d = d * math.exp(gv[b, t, hv, j])
        return d

    @cuda.jit(device=True)
    def beta_and_slope(beta, b, t, hv, j, beta_mode, use_sig, beta_s):
        """``(beta_t[j], d beta / d beta_raw)``; beta is ``[B, T, HV, 1]`` (scalar) or ``[B, T, HV, V]``."""
        if beta_mode == 0:
            return one, zero
        x = beta[b, t, hv, j if beta_mode == 2 else 0]
        if not use_sig:
            return x, one
        s = one / (one + math.exp(-x))
        return beta_s * s, beta_s * s * (one - s)

    def forward(q, k, v, g, gk, gv, beta, h0, a_log, dt_bias, cu, o, ht, states,
                n_seq, T, HV, K, V, G, scale, has_g, has_gk, has_gv, beta_mode, beta_s, has_h0,
                use_l2, use_sig, use_gate, has_dt_bias, varlen, store):
        n, hv, h, j = column_thread(cuda.grid(1), HV, V, G)
        if n >= n_seq:
            return
        b, bos, eos = seq_bounds(cu, n, T, varlen)
        S = cuda.local.array(MAX_K, f32)
        load_column(S, h0, n, hv, j, K, has_h0)
        for t in range(bos, eos):
            if store:
                for i in range(K):
                    states[b, t, hv, i, j] = S[i]
            dcol = column_decay(g, gv, a_log, dt_bias, b, t, hv, j, has_g, has_gv, use_gate, has_dt_bias)
            rk = inv_norm(k, b, t, h, K, use_l2)
            rq = inv_norm(q, b, t, h, K, use_l2)
            kS = zero
            for i in range(K):
                d = dcol
                if has_gk:
                    d = d * math.exp(gk[b, t, hv, i])
                S[i] = S[i] * d if d != zero else zero
                kS += S[i] * (k[b, t, h, i] * rk)
            bt, _ = beta_and_slope(beta, b, t, hv, j, beta_mode, use_sig, beta_s)
            delta = bt * (v[b, t, hv, j] - kS)
            acc = zero
            for i in range(K):
                S[i] = S[i] + (k[b, t, h, i] * rk) * delta
                acc += S[i] * (q[b, t, h, i] * rq)
            o[b, t, hv, j] = scale * acc
        store_column(ht, S, n, hv, j, K)

    def backward(q, k, v, g, gk, gv, beta, a_log, dt_bias, cu, states, do, dht,
                 dq_part, dk_part, dgk_part, zcol, dv, dbeta_col, dh0,
                 n_seq, T, HV, K, V, G, scale, has_g, has_gk, has_gv, beta_mode, beta_s, has_h0,
                 use_l2, use_sig, use_gate, has_dt_bias, varlen, has_dht):
        n, hv, h, j = column_thread(cuda.grid(1), HV, V, G)
        if n >= n_seq:
            return
        b, bos, eos = seq_bounds(cu, n, T, varlen)
        dS = cuda.local.array(MAX_K, f32)  # gradient w.r.t. column j of the state after step t
        St = cuda.local.array(MAX_K, f32)  # decayed state S~ of step t
        dec = cuda.local.array(MAX_K, f32)  # decay D_t[:, j]
        load_column(dS, dht, n, hv, j, K, has_dht)
        for t in range(eos - 1, bos - 1, -1):
            dcol = column_decay(g, gv, a_log, dt_bias, b, t, hv, j, has_g, has_gv, use_gate, has_dt_bias)
            rk = inv_norm(k, b, t, h, K, use_l2)
            rq = inv_norm(q, b, t, h, K, use_l2)
            kS = zero
            for i in range(K):
                d = dcol
                if has_gk:
                    d = d * math.exp(gk[b, t, hv, i])
                dec[i] = d
                St[i] = d * states[b, t, hv, i, j] if d != zero else zero
                kS += St[i] * (k[b, t, h, i] * rk)
            bt, slope = beta_and_slope(beta, b, t, hv, j, beta_mode, use_sig, beta_s)
            u = v[b, t, hv, j] - kS
            delta = bt * u
            dout = do[b, t, hv, j]
            ddelta = zero
            for i in range(K):
                kh = k[b, t, h, i] * rk
                dS[i] += scale * (q[b, t, h, i] * rq) * dout
                dq_part[b, t, hv, i, j] = scale * (St[i] + kh * delta) * dout
                ddelta += dS[i] * kh
            # A zero cotangent meets beta and the decay below at a token past a NaN or an infinity (or at a reset):
            # the products are skipped, so nothing from that token reaches the earlier ones.
            e = bt * ddelta if ddelta != zero else zero
            dv[b, t, hv, j] = e
            if beta_mode != 0:  # the sigmoid's slope is applied here, so this is already d beta_raw
                dbeta_col[b, t, hv, j] = ddelta * u * slope
            z = zero
            for i in range(K):
                kh = k[b, t, h, i] * rk
                dk_part[b, t, hv, i, j] = dS[i] * delta - St[i] * e
                dSt = dS[i] - kh * e
                zi = dSt * St[i] if dSt != zero else zero
                if has_gk:
                    dgk_part[b, t, hv, i, j] = zi
                z += zi
                dS[i] = dec[i] * dSt if dSt != zero else zero
            if has_g or has_gv:
                zcol[b, t, hv, j] = z
        if has_h0:
            store_column(dh0, dS, n, hv, j, K)

    # forward_py / backward_py stay uncompiled so a PTX compile check can type them without a GPU.
    return types.SimpleNamespace(forward=cuda.jit(forward), backward=cuda.jit(backward),
                                 forward_py=forward, backward_py=backward)


def _common_args(p: GDNProblem, L: NumbaLauncher) -> tuple[list[Any], list[Any]]:
    """Device arrays ``[q, k, v, g, gk, gv, beta, A_log, dt_bias, cu]`` and the trailing scalar arguments."""
    xp = p.xp
    f32 = np.float32
    q, k, v = (L.put_f32(x) for x in (p.q, p.k, p.v))
    g, gk, gv = L.put_f32_or_dummy(p.g, 3), L.put_f32_or_dummy(p.gk, 4), L.put_f32_or_dummy(p.gv, 4)
    if p.beta is None:
        beta, beta_mode = L.dummy(4), 0
    elif p.beta_per_v:
        beta, beta_mode = L.put_f32(p.beta), 2
    else:
        beta, beta_mode = L.put_f32(p.beta[..., None]), 1
    a_log, dt_bias = L.put_f32_or_dummy(p.A_log, 1), L.put_f32_or_dummy(p.dt_bias, 1)
    if p.cu_seqlens is not None:
        cu = L.put(xp.asarray(p.cu_seqlens, dtype=np.int64))
    else:
        cu = L.put(xp.zeros(1, dtype=np.int64))
    arrays = [q, k, v, g, gk, gv, beta, a_log, dt_bias, cu]
    scalars = [p.N, p.T, p.HV, p.K, p.V, p.HV // p.H, f32(p.scale), p.g is not None, p.gk is not None,
               p.gv is not None, beta_mode, f32(2.0 if p.allow_neg_eigval else 1.0), p.initial_state is not None,
               p.use_qk_l2norm_in_kernel, p.use_beta_sigmoid_in_kernel, p.use_gate_in_kernel,
               p.dt_bias is not None, p.cu_seqlens is not None]
    return arrays, scalars


def _run_forward(p: GDNProblem, L: NumbaLauncher, store_states: bool) -> tuple[Any, Any, Any, list[Any], list[Any]]:
    """Launch the forward kernel; returns ``(o, ht, states device array or None, common arrays, scalars)``."""
    xp = p.xp
    arrays, scalars = _common_args(p, L)
    q, k, v, g, gk, gv, beta, a_log, dt_bias, cu = arrays
    h0 = L.put_f32_or_dummy(p.initial_state, 4)
    o = empty(xp, (p.B, p.T, p.HV, p.V), np.float32)
    ht = empty(xp, (p.N, p.HV, p.K, p.V), np.float32)
    if store_states:
        # The backward only needs the states on the device: never copied back.
        d_o, d_ht = L.put(o), L.put(ht)
        d_states = L.put(empty(xp, (p.B, p.T, p.HV, p.K, p.V), np.float32))
    else:
        d_o, d_ht = L.out(o), L.out(ht)
        d_states = L.dummy(5)
    L.launch(_kernels().forward, p.N * p.HV * p.V, q, k, v, g, gk, gv, beta, h0, a_log, dt_bias, cu,
             d_o, d_ht, d_states, *scalars, store_states)
    return o, ht, (d_states if store_states else None), arrays, scalars


def recurrent_forward(p: GDNProblem) -> tuple[Any, Any]:
    """Gated delta rule forward, token by token, in float32.

    Args:
        p: the validated call (README.md for the math and every option).

    Returns:
        ``(o, ht)``: o ``[B, T, HV, V]`` and the final state ``[N, HV, K, V]``, both float32, in the array
        library of ``p.q``. With ``p.inplace_final_state`` the final state is also written into
        ``p.initial_state``, which is returned as ``ht``.
    """
    check_numba_problem(p)
    with device_scope(p):
        L = NumbaLauncher(p.xp)
        o, ht, _, _, _ = _run_forward(p, L, store_states=False)
        L.finish()
        if p.inplace_final_state:
            p.initial_state[...] = ht
            ht = p.initial_state
    return o, ht


def recurrent_backward(p: GDNProblem, do: Any, dht: Any) -> dict[str, Any]:
    """Gradients of the gated delta rule (README.md backward), in float32.

    Args:
        p: the validated call of the forward.
        do: output cotangent ``[B, T, HV, V]``.
        dht: final-state cotangent ``[N, HV, K, V]``, or None.

    Returns:
        dict with keys among ``q, k`` (``[B, T, H, K]``), ``v`` (``[B, T, HV, V]``), ``g`` (``[B, T, HV]``),
        ``gk``, ``gv``, ``beta`` (shaped like their inputs), ``initial_state`` (``[N, HV, K, V]``), ``A_log``,
        ``dt_bias`` (``[HV]``): one per input that was given, float32, in the array library of ``p.q``.
    """
    check_numba_problem(p)
    xp = p.xp
    f32 = np.float32
    B, T, HV, K, V, N = p.B, p.T, p.HV, p.K, p.V, p.N
    with device_scope(p):
        L = NumbaLauncher(xp)
        _, _, d_states, arrays, scalars = _run_forward(p, L, store_states=True)
        q, k, v, g, gk, gv, beta, a_log, dt_bias, cu = arrays
        d_do = L.put_f32(xp.asarray(do))
        d_dht = L.put_f32_or_dummy(None if dht is None else xp.asarray(dht), 4)

        dq_part = empty(xp, (B, T, HV, K, V), f32)
        dk_part = empty(xp, (B, T, HV, K, V), f32)
        dv = empty(xp, (B, T, HV, V), f32)
        dgk_part = empty(xp, (B, T, HV, K, V), f32) if p.gk is not None else None
        zcol = empty(xp, (B, T, HV, V), f32) if (p.g is not None or p.gv is not None) else None
        dbeta_col = empty(xp, (B, T, HV, V), f32) if p.beta is not None else None
        dh0 = empty(xp, (N, HV, K, V), f32) if p.initial_state is not None else None

        L.launch(_kernels().backward, N * HV * V, q, k, v, g, gk, gv, beta, a_log, dt_bias, cu, d_states,
                 d_do, d_dht, L.out(dq_part), L.out(dk_part), L.out_or_dummy(dgk_part, 5), L.out_or_dummy(zcol, 4),
                 L.out(dv), L.out_or_dummy(dbeta_col, 4), L.out_or_dummy(dh0, 4), *scalars, dht is not None)
        L.finish()

        dq, dk = qk_input_grads(p, dq_part.sum(axis=-1), dk_part.sum(axis=-1))
        grads: dict[str, Any] = {"q": dq, "k": dk, "v": dv}
        if p.g is not None:
            grads.update(gate_input_grads(p, zcol.sum(axis=-1)))  # zcol: gradient w.r.t. the log-decay g_t
        if p.gk is not None:
            grads["gk"] = dgk_part.sum(axis=-1)
        if p.gv is not None:
            grads["gv"] = zcol
        if p.beta is not None:
            grads["beta"] = dbeta_col if p.beta_per_v else dbeta_col.sum(axis=-1)
        if dh0 is not None:
            grads["initial_state"] = dh0
    return grads


def forward(p: GDNProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The numba backend's forward (the backend protocol, ``rawdelta/ops/common/opdef.py``): ``((o, ht), None)``;
    its backward recomputes what it needs."""
    return recurrent_forward(p), None


def backward(p: GDNProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The numba backend's backward (the backend protocol): :func:`recurrent_backward`."""
    return recurrent_backward(p, do, dht)
