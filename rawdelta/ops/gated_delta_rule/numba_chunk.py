"""The ``numba`` backend of the chunked gated delta rule: readable Numba CUDA reference kernels.

The kernels follow the chunked algorithm (the peer's stages; README.md beside this file defines the op)
in float32, without tensor cores, one kernel per stage. The stages every family with a decayed linear state
shares (chunk tables, gate cumsum, triangular inverse, state passes, output, their backward, the gate
gradient) are ``ops/common/numba_chunk_stages.py``, run here with a scalar gate and the delta (WY) update
rule; this module holds what is GDN's own. In a chunk with start state ``S0`` ``[K, V]``, rows
``r = 0 .. n-1`` and the chunk-local inclusive cumsum ``G_r`` of the log-decay:

* ``L_rj = beta_r (k_r . k_j) e^(G_r - G_j)`` (j < r), ``A = (I + L)^-1``,
  ``w = A (beta e^G k)`` ``[n, K]``, ``u = A (beta v)`` ``[n, V]``;
* ``delta = u - w S0``, ``S_end = e^G_last S0 + sum_r e^(G_last - G_r) k_r delta_r^T``;
* ``o_r = scale (e^G_r q_r^T S0 + sum_{j <= r} e^(G_r - G_j) (q_r . k_j) delta_j)``.

Every decay across a reset (a gate whose float32 decay is 0) is 0, taken from the reset counts R beside G, and
backward terms with a zero cotangent are skipped: the shared stages' rules (numba_chunk_stages.py).

Forward stages (kernels; * marks the shared ones): ``token_inputs`` (per token and key head: q^, k^ through
the L2 norm, and per value head the log-decay step through the in-kernel gate and the effective beta),
``chunk_local_cumsum``*, ``scaled_kkt`` (L), ``invert_unit_lower``* (A), ``wy_representation`` (w, u),
``state_pass_fwd``* (h per chunk, delta, final state), ``chunk_output``*.

Backward (derivation in :func:`chunk_backward`): the forward stages again, then ``chunk_output_dv_local``*,
``state_pass_bwd``* (dh per chunk, the full d delta, dh0), ``chunk_qk_grads``* (dq, dk, dw and the exponent
gradients of the decay factors), ``wy_bwd_inputs`` (through w = A X, u = A Y: dk, dv, dbeta and dA),
``invert_unit_lower_bwd``* (dL), ``kkt_bwd`` (through L to k, beta and the decay exponents), ``gate_grad``*;
the group sum over value heads, the L2-norm, beta-sigmoid and gate-in-kernel backward run as array code.

Works on numpy arrays (copied to the device, or to the Numba CUDA simulator with
``NUMBA_ENABLE_CUDASIM=1``) and on CuPy device arrays (zero-copy, on CuPy's current stream or
``p.stream``), like the recurrent numba backend whose launcher it shares.
"""

from __future__ import annotations

import functools
import math
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.backend import numba_cuda
from ..common.numba_chunk_stages import NumbaChunkStages, chunk_tables
from ..common.numba_device import device_helpers
from ..common.numba_launch import NumbaLauncher
from .definition import FAMILY
from .numba_common import check_numba_problem, device_functions, device_scope, gate_input_grads, qk_input_grads

if TYPE_CHECKING:
    from .definition import GDNProblem

__all__ = ["backward", "chunk_backward", "chunk_forward", "chunk_tables", "forward"]

# numba.cuda, bound by _kernels(). Kernels must reach it as a module global (the reason is in
# ops/common/numba_device.py).
cuda: Any = None


@functools.cache
def _kernels() -> Any:
    """Compile (lazily, once) GDN's own chunk kernels; returns a namespace of them.

    Per-row kernels end with the geometry ``n_chunks, C, HV, group, K, V`` (group = HV // H) and start by
    mapping the thread to ``(chunk c, value head hv, row r)``; ``chunks`` is the int64 table ``[NC, 3]`` of
    (batch row, first token, rows). Token-indexed buffers are float32 ``[B, T, HV, ...]``, the gate cumsum G
    ``[B, T, HV, 1]`` (one lane: a scalar gate) and the exponent gradients dexp ``[B, T, HV, C + 1, 1]``
    (numba_chunk_stages.py); q^, k^ are ``[B, T, H, K]``.
    """
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    one = f32(1.0)
    zero = f32(0.0)
    helpers = device_helpers()
    chunk_row, dot, dot0 = helpers.chunk_row, helpers.dot, helpers.dot0
    dev = device_functions()
    inv_norm, log_decay = dev.inv_norm, dev.log_decay

    @cuda.jit(device=True)
    def effective_beta(beta, b, t, hv, has_beta, use_sig, beta_s):
        """beta_t: 1 when absent, ``beta_s * sigmoid(beta_raw)`` with the sigmoid in kernel."""
        if not has_beta:
            return one
        x = beta[b, t, hv]
        if use_sig:
            return beta_s / (one + math.exp(-x))
        return x

    # ---- forward -------------------------------------------------------------------------------------

    def token_inputs(q, k, g, beta, a_log, dt_bias, qn, kn, gstep, beta_eff, B, T, H, HV, K, use_l2,
                     has_g, has_beta, use_gate, has_dt_bias, use_sig, beta_s):
        """Per (token, key head): q^, k^ ``[B, T, H, K]`` (L2-normalised, or copied), and for each value head of
        its group the log-decay step ``gstep`` ``[B, T, HV, 1]`` (0 without g) and the effective beta
        ``[B, T, HV]``."""
        tid = cuda.grid(1)
        if tid >= B * T * H:
            return
        h = tid % H
        t = (tid // H) % T
        b = tid // (H * T)
        rq = inv_norm(q, b, t, h, K, use_l2)
        rk = inv_norm(k, b, t, h, K, use_l2)
        for i in range(K):
            qn[b, t, h, i] = q[b, t, h, i] * rq
            kn[b, t, h, i] = k[b, t, h, i] * rk
        group = HV // H
        for hv in range(h * group, (h + 1) * group):
            gstep[b, t, hv, 0] = log_decay(g, a_log, dt_bias, b, t, hv, use_gate, has_dt_bias) if has_g else zero
            beta_eff[b, t, hv] = effective_beta(beta, b, t, hv, has_beta, use_sig, beta_s)

    def scaled_kkt(kn, G, R, beta_eff, chunks, Lmat, n_chunks, C, HV, group, K, V):
        """Row i of ``L_ij = beta_i (k_i . k_j) e^(G_i - G_j)`` for j < i, 0 across a reset (the rest is never
        read)."""
        c, hv, h, b, t0, n_rows, i, ti = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if i >= n_rows:
            return
        for j in range(i):
            tj = t0 + j
            Lmat[b, ti, hv, j] = zero
            if R[b, ti, hv, 0] == R[b, tj, hv, 0]:
                Lmat[b, ti, hv, j] = beta_eff[b, ti, hv] * dot(kn, b, ti, h, kn, tj, h, 0, K) * math.exp(
                    G[b, ti, hv, 0] - G[b, tj, hv, 0])

    def wy_representation(kn, v, G, R, beta_eff, Amat, chunks, w, u, n_chunks, C, HV, group, K, V):
        """Row r of ``w = A (beta e^G k)`` ``[B, T, HV, K]`` (``e^G`` 0 after a reset) and ``u = A (beta v)``
        ``[B, T, HV, V]``."""
        c, hv, h, b, t0, n_rows, r, tr = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if r >= n_rows:
            return
        for i in range(K):
            acc = zero
            for j in range(r + 1):
                tj = t0 + j
                if R[b, tj, hv, 0] == zero:
                    acc += Amat[b, tr, hv, j] * beta_eff[b, tj, hv] * math.exp(G[b, tj, hv, 0]) * kn[b, tj, h, i]
            w[b, tr, hv, i] = acc
        for i in range(V):
            acc = zero
            for j in range(r + 1):
                tj = t0 + j
                acc += Amat[b, tr, hv, j] * beta_eff[b, tj, hv] * v[b, tj, hv, i]
            u[b, tr, hv, i] = acc

    # ---- backward ------------------------------------------------------------------------------------

    def wy_bwd_inputs(kn, v, G, R, beta_eff, Amat, dw, ddelta, chunks, dk, dv, dbeta, dexp, dA,
                      n_chunks, C, HV, group, K, V):
        """Row r of the backward through the WY operands ``X = beta e^G k``, ``Y = beta v`` (``w = A X``,
        ``u = A Y``, ``du = d delta``): with ``dX = A^T dw``, ``dY = A^T du``, ``dk += beta e^G dX``,
        ``dv = beta dY``, ``dbeta = e^G (k . dX) + v . dY``, and ``beta e^G (k . dX)`` for the exponent of
        ``e^G_r``; and row r of the gradient w.r.t. A, ``dA = strictly-lower(dw X^T + du Y^T)``. Terms whose
        cotangent (dw, d delta and what comes of them) is 0 are skipped."""
        c, hv, hk, b, t0, n_rows, r, tr = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if r >= n_rows:
            return
        decay = math.exp(G[b, tr, hv, 0]) if R[b, tr, hv, 0] == zero else zero
        beta_r = beta_eff[b, tr, hv]
        k_dx = zero
        for i in range(K):
            dx = zero
            for m in range(r, n_rows):
                dwm = dw[b, t0 + m, hv, i]
                if dwm != zero:
                    dx += Amat[b, t0 + m, hv, r] * dwm
            if dx != zero:
                dk[b, tr, hv, i] += beta_r * decay * dx
                k_dx += kn[b, tr, hk, i] * dx
        v_dy = zero
        for j in range(V):
            dy = zero
            for m in range(r, n_rows):
                ddm = ddelta[b, t0 + m, hv, j]
                if ddm != zero:
                    dy += Amat[b, t0 + m, hv, r] * ddm
            dv[b, tr, hv, j] = beta_r * dy if dy != zero else zero
            v_dy += v[b, tr, hv, j] * dy
        kb_dx = decay * k_dx if k_dx != zero else zero
        dbeta[b, tr, hv] = kb_dx + v_dy
        if kb_dx != zero:
            dexp[b, tr, hv, 0, 0] += beta_r * kb_dx
        for m in range(r):
            tm = t0 + m
            x = dot0(ddelta, b, tr, hv, v, tm, hv, 0, V)
            dw_k = dot0(dw, b, tr, hv, kn, tm, hk, 0, K)
            if dw_k != zero and R[b, tm, hv, 0] == zero:
                x = math.exp(G[b, tm, hv, 0]) * dw_k + x
            dA[b, tr, hv, m] = beta_eff[b, tm, hv] * x if x != zero else zero

    def kkt_bwd(kn, G, R, beta_eff, Lmat, dL, chunks, dk, dbeta, dexp, n_chunks, C, HV, group, K, V):
        """Row i of the backward through ``L_ij = beta_i (k_i . k_j) e^(G_i - G_j)``: row i of L (j < i) feeds
        dk_i, dbeta_i and the exponents of ``e^(G_i - G_j)``; column i (rows j > i) feeds dk_i. Entries of dL that
        are 0, and those of L across a reset, are skipped."""
        c, hv, hk, b, t0, n_rows, i, ti = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if i >= n_rows:
            return
        db = zero
        for j in range(i):
            tj = t0 + j
            dl = dL[b, ti, hv, j]
            if dl != zero and R[b, ti, hv, 0] == R[b, tj, hv, 0]:
                e = dl * math.exp(G[b, ti, hv, 0] - G[b, tj, hv, 0])
                db += e * dot(kn, b, ti, hk, kn, tj, hk, 0, K)
                for x in range(K):
                    dk[b, ti, hv, x] += beta_eff[b, ti, hv] * e * kn[b, tj, hk, x]
                dexp[b, ti, hv, j + 1, 0] += dl * Lmat[b, ti, hv, j]
        for j in range(i + 1, n_rows):
            tj = t0 + j
            dl = dL[b, tj, hv, i]
            if dl != zero and R[b, tj, hv, 0] == R[b, ti, hv, 0]:
                e = dl * beta_eff[b, tj, hv] * math.exp(G[b, tj, hv, 0] - G[b, ti, hv, 0])
                for x in range(K):
                    dk[b, ti, hv, x] += e * kn[b, tj, hk, x]
        dbeta[b, ti, hv] += db

    kernels = {f.__name__: cuda.jit(f) for f in (token_inputs, scaled_kkt, wy_representation, wy_bwd_inputs, kkt_bwd)}
    return types.SimpleNamespace(**kernels)


class _ForwardStages(types.SimpleNamespace):
    """Device arrays left by :func:`_run_forward_stages` (float32).

    qn, kn ``[B, T, H, K]``, v ``[B, T, HV, V]``, G and its reset counts R ``[B, T, HV, 1]``, beta ``[B, T, HV]``,
    Lmat and A
    ``[B, T, HV, C]``, w ``[B, T, HV, K]``, h ``[NC, HV, K, V]`` (state at each chunk's start), delta
    ``[B, T, HV, V]``.
    """


def _run_forward_stages(p: GDNProblem, st: NumbaChunkStages, ht: Any) -> _ForwardStages:
    """Launch every forward stage but the output, writing the final state into the device array `ht`."""
    f32 = np.float32
    B, T, H, HV, K, V, C = p.B, p.T, p.H, p.HV, p.K, p.V, st.rows[1]
    L = st.L
    kern = _kernels()
    s = _ForwardStages()
    q, k = (L.put(x.astype(f32, copy=False)) for x in (p.q, p.k))
    s.v = L.put(p.v.astype(f32, copy=False))
    s.qn, s.kn = L.scratch(B, T, H, K), L.scratch(B, T, H, K)
    s.G, s.R, s.beta = L.scratch(B, T, HV, 1), L.scratch(B, T, HV, 1), L.scratch(B, T, HV)
    L.launch(kern.token_inputs, B * T * H, q, k, L.put_or_dummy(p.g, 3), L.put_or_dummy(p.beta, 3),
             L.put_or_dummy(p.A_log, 1), L.put_or_dummy(p.dt_bias, 1), s.qn, s.kn, s.G, s.beta, B, T, H, HV, K,
             p.use_qk_l2norm_in_kernel, p.g is not None, p.beta is not None, p.use_gate_in_kernel,
             p.dt_bias is not None, p.use_beta_sigmoid_in_kernel, f32(2.0 if p.allow_neg_eigval else 1.0))
    st.chunk_local_cumsum(s.G, s.G, s.R)

    s.Lmat, s.A = L.scratch(B, T, HV, C), L.scratch(B, T, HV, C)
    L.launch(kern.scaled_kkt, st.row_threads, s.kn, s.G, s.R, s.beta, st.chunks, s.Lmat, *st.rows)
    st.invert_unit_lower(s.Lmat, s.A)
    s.w, u = L.scratch(B, T, HV, K), L.scratch(B, T, HV, V)
    L.launch(kern.wy_representation, st.row_threads, s.kn, s.v, s.G, s.R, s.beta, s.A, st.chunks, s.w, u,
             *st.rows)

    s.h, s.delta = L.scratch(st.n_chunks, HV, K, V), L.scratch(B, T, HV, V)
    h0 = None if p.initial_state is None else L.put(p.initial_state)
    st.state_pass_fwd(s.kn, s.G, s.R, u, h0, s.h, s.delta, ht, w=s.w)
    return s


def _stages(p: GDNProblem, chunk_size: int, L: NumbaLauncher) -> NumbaChunkStages:
    """The shared stages for a call: a scalar gate, the delta rule."""
    return NumbaChunkStages(L, p.seq_bounds, chunk_size, p.H, p.HV, p.K, p.V, gate_form="scalar",
                            update_rule="delta")


def chunk_forward(p: GDNProblem, chunk_size: int) -> tuple[Any, Any]:
    """Chunked gated delta rule forward in float32.

    Args:
        p: the validated call (README.md for the math and every option; no gk, gv or per-V beta here).
        chunk_size: rows per chunk, at most 64.

    Returns:
        ``(o, ht)``: o ``[B, T, HV, V]`` and the final state ``[N, HV, K, V]`` (always computed; an empty
        sequence's is its initial state, or zeros), both float32, in the array library of ``p.q``.
    """
    check_numba_problem(p)
    xp = p.xp
    with device_scope(p):
        L = NumbaLauncher(xp)
        o = empty(xp, (p.B, p.T, p.HV, p.V), np.float32)
        ht = empty(xp, (p.N, p.HV, p.K, p.V), np.float32)
        st = _stages(p, chunk_size, L)
        s = _run_forward_stages(p, st, L.out(ht))
        st.chunk_output(s.qn, s.kn, s.G, s.R, s.h, s.delta, L.out(o), p.scale)
        L.finish()
    return o, ht


def chunk_backward(p: GDNProblem, chunk_size: int, do: Any, dht: Any) -> dict[str, Any]:
    """Gradients of the chunked gated delta rule in float32, chunk by chunk.

    Per chunk, with the forward's notation (module docstring), ``dh`` the gradient w.r.t. the chunk's end
    state and ``S0 = h[c]``:

    * ``d delta_s = scale sum_{r >= s} e^(G_r - G_s) (k_s . q_r) do_r + e^(G_last - G_s) dh^T k_s``; the
      start state's gradient ``e^G_last dh + scale sum_r e^G_r q_r do_r^T - w^T d delta`` is the previous
      chunk's dh (or dh0);
    * dq, dk and ``dw = -S0 d delta`` through the output and the state update (``chunk_qk_grads``);
    * through ``w = A X``, ``u = A Y``: ``dX = A^T dw``, ``dY = A^T d delta``,
      ``dL = -A^T strictly-lower(dw X^T + d delta Y^T) A^T``, then through ``X``, ``Y`` and ``L`` to k, v
      and beta;
    * the gate: each term's gradient w.r.t. the exponent of its decay factor ``e^(G_a - G_j)`` is collected
      per pair (a, j), the WY and L terms' included, and ``dg_s`` (natural log) is the total over the pairs
      with ``a >= s > j`` (numba_chunk_stages.py). This equals the peer's reverse cumsum of
      ``dG_t = q_t . dq_t - k_t . dk_t + ...`` within the chunk but never forms it: there, O(1) terms (the
      diagonal ``q_t . k_t``, ``<dh, S_end>``) cancel down to a dg that is tiny under strong decay, and in
      float32 that broke the gate tolerance at small K (dA_log 4e-3 relative error against 3e-5 here, chunk 64
      with the gate in kernel, K = 8).

    Args:
        p: the validated call of the forward.
        chunk_size: the forward's chunk size.
        do: output cotangent ``[B, T, HV, V]``.
        dht: final-state cotangent ``[N, HV, K, V]``, or None.

    Returns:
        dict keyed ``q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias``: float32 gradients w.r.t. the
        raw inputs (through the L2 norm, the beta sigmoid and the in-kernel gate), q and k ``[B, T, H, K]``
        summed over each group of value heads, the others shaped like their inputs; None for absent inputs
        (gk and gv always).
    """
    check_numba_problem(p)
    xp = p.xp
    f32 = np.float32
    B, T, HV, K, V, N, C = p.B, p.T, p.HV, p.K, p.V, p.N, chunk_size
    kern = _kernels()
    with device_scope(p):
        L = NumbaLauncher(xp)
        st = _stages(p, C, L)
        s = _run_forward_stages(p, st, L.scratch(N, HV, K, V))
        d_do = L.put(xp.asarray(do).astype(f32, copy=False))
        d_dht = None if dht is None else L.put(xp.asarray(dht).astype(f32, copy=False))
        dq, dk = empty(xp, (B, T, HV, K), f32), empty(xp, (B, T, HV, K), f32)
        dv = empty(xp, (B, T, HV, V), f32)
        dbeta = empty(xp, (B, T, HV), f32)
        dg = empty(xp, (B, T, HV), f32) if p.g is not None else None
        dh0 = empty(xp, (N, HV, K, V), f32) if p.initial_state is not None else None
        d_dq, d_dk, d_dv = L.out(dq), L.out(dk), L.out(dv)
        d_dbeta = L.out(dbeta) if p.beta is not None else L.put(dbeta)
        ddelta, dh, dw = L.scratch(B, T, HV, V), L.scratch(st.n_chunks, HV, K, V), L.scratch(B, T, HV, K)
        dA, P, dL = L.scratch(B, T, HV, C), L.scratch(B, T, HV, C), L.scratch(B, T, HV, C)
        dexp, dexp_end = L.scratch(B, T, HV, C + 1, 1), L.scratch(B, T, HV, 1)

        st.chunk_output_dv_local(s.qn, s.kn, s.G, s.R, d_do, ddelta, p.scale)
        st.state_pass_bwd(s.qn, s.kn, s.G, s.R, d_do, d_dht, ddelta, dh, None if dh0 is None else L.out(dh0),
                          p.scale, w=s.w)
        st.chunk_qk_grads(s.qn, s.kn, s.G, s.R, s.h, dh, s.delta, ddelta, d_do, d_dq, d_dk, dexp, dexp_end,
                          p.scale, dw=dw)
        L.launch(kern.wy_bwd_inputs, st.row_threads, s.kn, s.v, s.G, s.R, s.beta, s.A, dw, ddelta, st.chunks, d_dk,
                 d_dv, d_dbeta, dexp, dA, *st.rows)
        st.invert_unit_lower_bwd(s.A, dA, P, dL)
        L.launch(kern.kkt_bwd, st.row_threads, s.kn, s.G, s.R, s.beta, s.Lmat, dL, st.chunks, d_dk, d_dbeta, dexp,
                 *st.rows)
        if dg is not None:
            st.gate_grad(dexp, dexp_end, L.out(dg.reshape(B, T, HV, 1)))
        L.finish()
    return _raw_input_grads(p, dq, dk, dv, dbeta, dg, dh0)


def forward(p: GDNProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The numba backend's forward (the backend protocol, ``rawdelta/ops/common/opdef.py``): ``((o, ht), None)``;
    its backward recomputes what it needs."""
    return chunk_forward(p, p.chunk_size), None


def backward(p: GDNProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The numba backend's backward (the backend protocol): :func:`chunk_backward`."""
    return chunk_backward(p, p.chunk_size, do, dht)


def _raw_input_grads(p: GDNProblem, dq: Any, dk: Any, dv: Any, dbeta: Any, dg: Any, dh0: Any) -> dict[str, Any]:
    """From the kernels' gradients (dq, dk ``[B, T, HV, K]`` w.r.t. q^, k^; dbeta, dg ``[B, T, HV]`` w.r.t. the
    effective beta and the log-decay) to the gradients w.r.t. the raw inputs, keyed like the family's gradients
    (``FAMILY.grad_fields``)."""
    xp = p.xp
    f32 = np.float32
    dq, dk = qk_input_grads(p, dq, dk)
    grads: dict[str, Any] = dict.fromkeys(FAMILY.grad_fields)
    grads.update(q=dq, k=dk, v=dv)
    if p.beta is not None:
        if p.use_beta_sigmoid_in_kernel:
            sig = f32(0.5) * (f32(1.0) + xp.tanh(f32(0.5) * p.beta))
            dbeta = dbeta * f32(2.0 if p.allow_neg_eigval else 1.0) * sig * (f32(1.0) - sig)
        grads["beta"] = dbeta
    if p.g is not None:
        grads.update(gate_input_grads(p, dg))
    if dh0 is not None:
        grads["initial_state"] = dh0
    return grads
