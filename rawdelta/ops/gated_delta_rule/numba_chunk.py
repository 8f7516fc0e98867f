"""The ``numba`` backend of the chunked gated delta rule: readable Numba CUDA reference kernels.

The kernels follow the chunked algorithm (the peer's stages; README.md beside this file defines the op)
in float32, without tensor cores, one kernel per stage. Per sequence and value head, the tokens are cut
into chunks of ``C`` rows that never cross a sequence start; in a chunk with start state ``S0``
``[K, V]``, rows ``r = 0 .. n-1`` and the chunk-local inclusive cumsum ``G_r`` of the log-decay:

* ``L_rj = beta_r (k_r . k_j) e^(G_r - G_j)`` (j < r), ``A = (I + L)^-1``,
  ``w = A (beta e^G k)`` ``[n, K]``, ``u = A (beta v)`` ``[n, V]``;
* ``delta = u - w S0``, ``S_end = e^G_last S0 + sum_r e^(G_last - G_r) k_r delta_r^T``;
* ``o_r = scale (e^G_r q_r^T S0 + sum_{j <= r} e^(G_r - G_j) (q_r . k_j) delta_j)``.

Gates stay in base e (the cumsum is of the natural-log decay, every factor is ``exp``), so the gate
gradient needs no ln 2 conversion. Every kept factor has a non-positive exponent for ``g <= 0``.

Forward stages (kernels): ``normalize_qk`` (per token and key head), ``gate_cumsum_and_beta`` (per
chunk and value head), ``scaled_kkt`` (L), ``invert_unit_lower`` (A, one thread per column),
``wy_representation`` (w, u), ``state_pass`` (per sequence, value head and state column: h per
chunk, delta, final state), ``chunk_output``. Per-row kernels run one thread per (chunk, value head,
row), rows fastest, on a 1-D grid; per-chunk matrices (L, A and the backward's) are stored with row r
at its token, ``[B, T, HV, C]``.

Backward (derivation in :func:`chunk_backward`): the forward stages again, then ``dv_local``,
``state_grad_pass`` (reverse over chunks: dh per chunk, the full d delta, dh0), ``qkw_grads`` (dq, dk,
dw, and the gradients w.r.t. the exponents of the decay factors), the WY backward in four per-row
kernels (``wy_bwd_inputs``, ``wy_bwd_dA_At``, ``wy_bwd_dL``, ``kkt_bwd``), ``gate_grad`` (dg from the
exponent gradients); the group sum over value heads, the L2-norm, beta-sigmoid and gate-in-kernel
backward run as array code.

Works on numpy arrays (copied to the device, or to the Numba CUDA simulator with
``NUMBA_ENABLE_CUDASIM=1``) and on CuPy device arrays (zero-copy, on CuPy's current stream or
``p.stream``), like the recurrent numba backend whose launcher it shares.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import numpy as np

from ..._arrays import empty
from ..common.backend import numba_cuda
from ..common.numba_launch import NumbaLauncher
from .calls import GatedDeltaRuleGrads
from .numba_common import (
    MAX_K,
    check_numba_problem,
    device_scope,
    gate_input_grads,
    qk_input_grads,
)
from .numba_ref import device_functions
from .problem import CHUNK_SIZES, GDNProblem

MAX_CHUNK = max(CHUNK_SIZES)  # the per-row dA buffer of the WY backward is a local array of this size

# numba.cuda, bound by _kernels(). Kernels must reach it as a module global: the CUDA simulator swaps
# the module in a kernel's globals for its fake one (closure variables would escape the swap).
cuda: Any = None


@functools.cache
def _kernels() -> Any:
    """Compile (lazily, once) the device functions and the kernels; returns a namespace of kernels.

    Per-row kernels end with the geometry ``n_chunks, C, HV, group, K, V`` (group = HV // H) and start
    by mapping the thread to ``(chunk c, value head hv, row r)``; ``chunks`` is the int64 table
    ``[NC, 3]`` of (batch row, first token, rows), ``seqs`` the int64 table ``[N, 2]`` of (first chunk,
    number of chunks). Token-indexed buffers are float32 ``[B, T, HV, ...]``; q^, k^ are
    ``[B, T, H, K]``; per-chunk states h, dh are ``[NC, HV, K, V]``.
    """
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    one = f32(1.0)
    zero = f32(0.0)

    @cuda.jit(device=True)
    def row_thread(tid, C, HV):
        """``(chunk, value head, row)`` of a thread of a per-row kernel (rows fastest)."""
        return tid // (C * HV), (tid // C) % HV, tid % C

    @cuda.jit(device=True)
    def dot(x, b, tx, hx, y, ty, hy, n):
        """``x[b, tx, hx, :n] . y[b, ty, hy, :n]``."""
        acc = zero
        for i in range(n):
            acc += x[b, tx, hx, i] * y[b, ty, hy, i]
        return acc

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

    def normalize_qk(q, k, qn, kn, B, T, H, K, use_l2):
        """q^, k^ ``[B, T, H, K]``: q and k L2-normalised (or copied) per (token, key head)."""
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

    def gate_cumsum_and_beta(g, beta, a_log, dt_bias, chunks, G, beta_eff, n_chunks, HV,
                             has_g, has_beta, use_gate, has_dt_bias, use_sig, beta_s):
        """Per (chunk, value head): G ``[B, T, HV]`` (chunk-local inclusive cumsum of the log-decay, 0 without
        g) and the effective beta ``[B, T, HV]``."""
        tid = cuda.grid(1)
        if tid >= n_chunks * HV:
            return
        c = tid // HV
        hv = tid % HV
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        acc = zero
        for r in range(n_rows):
            t = t0 + r
            if has_g:
                acc += log_decay(g, a_log, dt_bias, b, t, hv, use_gate, has_dt_bias)
            G[b, t, hv] = acc
            beta_eff[b, t, hv] = effective_beta(beta, b, t, hv, has_beta, use_sig, beta_s)

    def scaled_kkt(kn, G, beta_eff, chunks, Lmat, n_chunks, C, HV, group, K, V):
        """Row i of ``L_ij = beta_i (k_i . k_j) e^(G_i - G_j)`` for j < i (the rest is never read)."""
        c, hv, i = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or i >= chunks[c, 2]:
            return
        b, t0 = chunks[c, 0], chunks[c, 1]
        h = hv // group
        ti = t0 + i
        for j in range(i):
            tj = t0 + j
            Lmat[b, ti, hv, j] = beta_eff[b, ti, hv] * dot(kn, b, ti, h, kn, tj, h, K) * math.exp(
                G[b, ti, hv] - G[b, tj, hv])

    def invert_unit_lower(Lmat, chunks, Amat, n_chunks, C, HV, group, K, V):
        """Column ``col`` of ``A = (I + L)^-1`` by forward substitution of ``(I + L) a = e_col``."""
        c, hv, col = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or col >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        for i in range(n_rows):
            a = one if i == col else zero
            for j in range(col, i):
                a -= Lmat[b, t0 + i, hv, j] * Amat[b, t0 + j, hv, col]
            Amat[b, t0 + i, hv, col] = a

    def wy_representation(kn, v, G, beta_eff, Amat, chunks, w, u, n_chunks, C, HV, group, K, V):
        """Row r of ``w = A (beta e^G k)`` ``[B, T, HV, K]`` and ``u = A (beta v)`` ``[B, T, HV, V]``."""
        c, hv, r = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or r >= chunks[c, 2]:
            return
        b, t0 = chunks[c, 0], chunks[c, 1]
        h = hv // group
        tr = t0 + r
        for i in range(K):
            acc = zero
            for j in range(r + 1):
                tj = t0 + j
                acc += Amat[b, tr, hv, j] * beta_eff[b, tj, hv] * math.exp(G[b, tj, hv]) * kn[b, tj, h, i]
            w[b, tr, hv, i] = acc
        for i in range(V):
            acc = zero
            for j in range(r + 1):
                tj = t0 + j
                acc += Amat[b, tr, hv, j] * beta_eff[b, tj, hv] * v[b, tj, hv, i]
            u[b, tr, hv, i] = acc

    def state_pass(kn, G, w, u, h0, chunks, seqs, h, delta, ht, n_seq, HV, group, K, V, has_h0):
        """Per (sequence, value head, state column j), over the sequence's chunks in order: the start state
        ``h[c]``, ``delta = u - w S0`` ``[B, T, HV, V]``, and the final state ``ht`` ``[N, HV, K, V]``."""
        tid = cuda.grid(1)
        if tid >= n_seq * HV * V:
            return
        j = tid % V
        hv = (tid // V) % HV
        n = tid // (V * HV)
        hk = hv // group
        S = cuda.local.array(MAX_K, f32)
        for i in range(K):
            S[i] = h0[n, hv, i, j] if has_h0 else zero
        for c in range(seqs[n, 0], seqs[n, 0] + seqs[n, 1]):
            b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            for i in range(K):
                h[c, hv, i, j] = S[i]
            for r in range(n_rows):
                t = t0 + r
                ws = zero
                for i in range(K):
                    ws += w[b, t, hv, i] * S[i]
                delta[b, t, hv, j] = u[b, t, hv, j] - ws
            g_last = G[b, t0 + n_rows - 1, hv]
            for i in range(K):
                acc = math.exp(g_last) * S[i]
                for r in range(n_rows):
                    t = t0 + r
                    acc += math.exp(g_last - G[b, t, hv]) * kn[b, t, hk, i] * delta[b, t, hv, j]
                S[i] = acc
        for i in range(K):
            ht[n, hv, i, j] = S[i]

    def chunk_output(qn, kn, G, h, delta, chunks, o, n_chunks, C, HV, group, K, V, scale):
        """Row r of ``o = scale (e^G_r q_r^T h[c] + sum_{s <= r} e^(G_r - G_s) (q_r . k_s) delta_s)``."""
        c, hv, r = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or r >= chunks[c, 2]:
            return
        b, t0 = chunks[c, 0], chunks[c, 1]
        hk = hv // group
        tr = t0 + r
        decay = scale * math.exp(G[b, tr, hv])
        for j in range(V):
            acc = zero
            for i in range(K):
                acc += qn[b, tr, hk, i] * h[c, hv, i, j]
            o[b, tr, hv, j] = decay * acc
        for s in range(r + 1):
            ts = t0 + s
            a = scale * dot(qn, b, tr, hk, kn, ts, hk, K) * math.exp(G[b, tr, hv] - G[b, ts, hv])
            for j in range(V):
                o[b, tr, hv, j] += a * delta[b, ts, hv, j]

    # ---- backward ------------------------------------------------------------------------------------

    def dv_local(qn, kn, G, do, chunks, ddelta, n_chunks, C, HV, group, K, V, scale):
        """Row s of the intra-chunk output's gradient w.r.t. delta:
        ``d delta_s = scale sum_{r >= s} e^(G_r - G_s) (k_s . q_r) do_r`` ``[B, T, HV, V]``."""
        c, hv, s = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or s >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        hk = hv // group
        ts = t0 + s
        for j in range(V):
            ddelta[b, ts, hv, j] = zero
        for r in range(s, n_rows):
            tr = t0 + r
            a = scale * dot(kn, b, ts, hk, qn, tr, hk, K) * math.exp(G[b, tr, hv] - G[b, ts, hv])
            for j in range(V):
                ddelta[b, ts, hv, j] += a * do[b, tr, hv, j]

    def state_grad_pass(qn, kn, G, w, do, dht, chunks, seqs, ddelta, dh, dh0, n_seq, HV, group, K, V, scale,
                        has_dht, has_h0):
        """Per (sequence, value head, column j), chunks in reverse: ``dh[c]`` (gradient w.r.t. the state at the
        chunk's end), ``d delta_s += e^(G_last - G_s) dS^T k_s``, then the gradient w.r.t. the chunk's start state
        ``dS = e^G_last dS + scale sum_r e^G_r q_r do_r^T - w^T d delta``; dh0 at the end."""
        tid = cuda.grid(1)
        if tid >= n_seq * HV * V:
            return
        j = tid % V
        hv = (tid // V) % HV
        n = tid // (V * HV)
        hk = hv // group
        dS = cuda.local.array(MAX_K, f32)
        for i in range(K):
            dS[i] = dht[n, hv, i, j] if has_dht else zero
        for c in range(seqs[n, 0] + seqs[n, 1] - 1, seqs[n, 0] - 1, -1):
            b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            g_last = G[b, t0 + n_rows - 1, hv]
            for i in range(K):
                dh[c, hv, i, j] = dS[i]
            for s in range(n_rows):
                ts = t0 + s
                kd = zero
                for i in range(K):
                    kd += kn[b, ts, hk, i] * dS[i]
                ddelta[b, ts, hv, j] += math.exp(g_last - G[b, ts, hv]) * kd
            for i in range(K):
                acc = math.exp(g_last) * dS[i]
                for r in range(n_rows):
                    tr = t0 + r
                    acc += (scale * math.exp(G[b, tr, hv]) * qn[b, tr, hk, i] * do[b, tr, hv, j]
                            - w[b, tr, hv, i] * ddelta[b, tr, hv, j])
                dS[i] = acc
        if has_h0:
            for i in range(K):
                dh0[n, hv, i, j] = dS[i]

    def qkw_grads(qn, kn, G, h, dh, delta, ddelta, do, chunks, dq, dk, dw, dexp, dexp_end,
                  n_chunks, C, HV, group, K, V, scale):
        """Row a of the gradients through the output and the state update, per value head ``[B, T, HV, K]``:
        ``dq_a = scale (e^G_a h do_a + sum_{j <= a} e^(G_a - G_j) (do_a . delta_j) k_j)``,
        ``dk_a = e^(G_last - G_a) dh delta_a + scale sum_{r >= a} e^(G_r - G_a) (do_r . delta_a) q_r``,
        ``dw_a = -h d delta_a``; and the gradients w.r.t. the exponents of the decay factors these terms carry:
        row a of dexp (``e^G_a``, ``e^(G_a - G_j)``, and ``e^G_last`` on the last row) and
        ``dexp_end[a]`` (``e^(G_last - G_a)``)."""
        c, hv, a = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or a >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        hk = hv // group
        ta = t0 + a
        g_a = G[b, ta, hv]
        g_last = G[b, t0 + n_rows - 1, hv]
        for i in range(K):
            h_do = zero
            dh_delta = zero
            h_ddelta = zero
            for j in range(V):
                h_do += h[c, hv, i, j] * do[b, ta, hv, j]
                dh_delta += dh[c, hv, i, j] * delta[b, ta, hv, j]
                h_ddelta += h[c, hv, i, j] * ddelta[b, ta, hv, j]
            dq[b, ta, hv, i] = scale * math.exp(g_a) * h_do
            dk[b, ta, hv, i] = math.exp(g_last - g_a) * dh_delta
            dw[b, ta, hv, i] = -h_ddelta
        dexp[b, ta, hv, 0] = dot(qn, b, ta, hk, dq, ta, hv, K)
        dexp_end[b, ta, hv] = dot(kn, b, ta, hk, dk, ta, hv, K)
        if a == n_rows - 1:
            h_dh = zero
            for i in range(K):
                for j in range(V):
                    h_dh += h[c, hv, i, j] * dh[c, hv, i, j]
            dexp[b, ta, hv, 0] += math.exp(g_last) * h_dh
        for s in range(a + 1):
            ts = t0 + s
            e = scale * math.exp(g_a - G[b, ts, hv]) * dot(do, b, ta, hv, delta, ts, hv, V)
            for i in range(K):
                dq[b, ta, hv, i] += e * kn[b, ts, hk, i]
            dexp[b, ta, hv, s + 1] = e * dot(qn, b, ta, hk, kn, ts, hk, K)
        for r in range(a, n_rows):
            tr = t0 + r
            e = scale * math.exp(G[b, tr, hv] - g_a) * dot(do, b, tr, hv, delta, ta, hv, V)
            for i in range(K):
                dk[b, ta, hv, i] += e * qn[b, tr, hk, i]

    def wy_bwd_inputs(kn, v, G, beta_eff, Amat, dw, ddelta, chunks, dk, dv, dbeta, dexp,
                      n_chunks, C, HV, group, K, V):
        """Row r of the backward through the WY operands ``X = beta e^G k``, ``Y = beta v`` (``w = A X``,
        ``u = A Y``, ``du = d delta``): with ``dX = A^T dw``, ``dY = A^T du``, ``dk += beta e^G dX``,
        ``dv = beta dY``, ``dbeta = e^G (k . dX) + v . dY``, and ``beta e^G (k . dX)`` for the exponent of
        ``e^G_r``."""
        c, hv, r = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or r >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        hk = hv // group
        tr = t0 + r
        decay = math.exp(G[b, tr, hv])
        k_dx = zero
        for i in range(K):
            dx = zero
            for m in range(r, n_rows):
                dx += Amat[b, t0 + m, hv, r] * dw[b, t0 + m, hv, i]
            dk[b, tr, hv, i] += beta_eff[b, tr, hv] * decay * dx
            k_dx += kn[b, tr, hk, i] * dx
        v_dy = zero
        for j in range(V):
            dy = zero
            for m in range(r, n_rows):
                dy += Amat[b, t0 + m, hv, r] * ddelta[b, t0 + m, hv, j]
            dv[b, tr, hv, j] = beta_eff[b, tr, hv] * dy
            v_dy += v[b, tr, hv, j] * dy
        dbeta[b, tr, hv] = decay * k_dx + v_dy
        dexp[b, tr, hv, 0] += beta_eff[b, tr, hv] * decay * k_dx

    def wy_bwd_dA_At(kn, v, G, beta_eff, Amat, dw, ddelta, chunks, P, n_chunks, C, HV, group, K, V):
        """Row i of ``P = dA A^T`` ``[B, T, HV, C]``, where ``dA = strictly-lower(dw X^T + du Y^T)`` is the
        gradient w.r.t. A (A is unit lower triangular: only its strictly lower part depends on L)."""
        c, hv, i = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or i >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        hk = hv // group
        ti = t0 + i
        dA = cuda.local.array(MAX_CHUNK, f32)
        for m in range(i):
            tm = t0 + m
            dA[m] = beta_eff[b, tm, hv] * (math.exp(G[b, tm, hv]) * dot(dw, b, ti, hv, kn, tm, hk, K)
                                           + dot(ddelta, b, ti, hv, v, tm, hv, V))
        for j in range(n_rows):
            acc = zero
            for m in range(min(i, j + 1)):
                acc += dA[m] * Amat[b, t0 + j, hv, m]
            P[b, ti, hv, j] = acc

    def wy_bwd_dL(Amat, P, chunks, dL, n_chunks, C, HV, group, K, V):
        """Row i of the gradient w.r.t. L, ``dL = -A^T P`` (``A = (I + L)^-1``), strictly lower part only."""
        c, hv, i = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or i >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        for j in range(i):
            acc = zero
            for m in range(i, n_rows):
                acc += Amat[b, t0 + m, hv, i] * P[b, t0 + m, hv, j]
            dL[b, t0 + i, hv, j] = -acc

    def kkt_bwd(kn, G, beta_eff, Lmat, dL, chunks, dk, dbeta, dexp, n_chunks, C, HV, group, K, V):
        """Row i of the backward through ``L_ij = beta_i (k_i . k_j) e^(G_i - G_j)``: row i of L (j < i) feeds
        dk_i, dbeta_i and the exponents of ``e^(G_i - G_j)``; column i (rows j > i) feeds dk_i."""
        c, hv, i = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or i >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        hk = hv // group
        ti = t0 + i
        db = zero
        for j in range(i):
            tj = t0 + j
            e = dL[b, ti, hv, j] * math.exp(G[b, ti, hv] - G[b, tj, hv])
            db += e * dot(kn, b, ti, hk, kn, tj, hk, K)
            for x in range(K):
                dk[b, ti, hv, x] += beta_eff[b, ti, hv] * e * kn[b, tj, hk, x]
            dexp[b, ti, hv, j + 1] += dL[b, ti, hv, j] * Lmat[b, ti, hv, j]
        for j in range(i + 1, n_rows):
            tj = t0 + j
            e = dL[b, tj, hv, i] * beta_eff[b, tj, hv] * math.exp(G[b, tj, hv] - G[b, ti, hv])
            for x in range(K):
                dk[b, ti, hv, x] += e * kn[b, tj, hk, x]
        dbeta[b, ti, hv] += db

    def gate_grad(dexp, dexp_end, chunks, dg, n_chunks, C, HV, group, K, V):
        """Row s of the gradient w.r.t. the log-decay g ``[B, T, HV]`` (natural log). Every decay factor is
        ``e^(G_a - G_j)`` with ``G_a - G_j = g_(j+1) + ... + g_a``, so g_s gets the exponent gradients of the
        factors spanning step s (``a >= s > j``): the chunk-start factors of rows a >= s, the pairs
        ``j < s <= a`` in rows a >= s, and the chunk-end factors of rows j < s."""
        c, hv, s = row_thread(cuda.grid(1), C, HV)
        if c >= n_chunks or s >= chunks[c, 2]:
            return
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        acc = zero
        for a in range(s, n_rows):
            for col in range(s + 1):  # column 0 is the chunk start, column j + 1 is row j < s
                acc += dexp[b, t0 + a, hv, col]
        for j in range(s):
            acc += dexp_end[b, t0 + j, hv]
        dg[b, t0 + s, hv] = acc

    kernels = {f.__name__: cuda.jit(f) for f in (
        normalize_qk, gate_cumsum_and_beta, scaled_kkt, invert_unit_lower, wy_representation, state_pass,
        chunk_output, dv_local, state_grad_pass, qkw_grads, wy_bwd_inputs, wy_bwd_dA_At, wy_bwd_dL, kkt_bwd,
        gate_grad)}
    return types.SimpleNamespace(**kernels)


def chunk_tables(seq_bounds: list[tuple[int, int, int]], chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk table and the sequence table of a call, built on the host.

    Args:
        seq_bounds: ``(batch row, first token, end token)`` per sequence (``GDNProblem.seq_bounds``).
        chunk_size: rows per chunk; a sequence's last chunk may be shorter, an empty sequence has none.

    Returns:
        ``(chunks, seqs)``, int64: chunks ``[NC, 3]`` of (batch row, first token, rows), numbered sequence by
        sequence (the number is also the chunk's slot in the per-chunk state buffers); seqs ``[N, 2]`` of
        (first chunk, number of chunks).
    """
    chunks: list[tuple[int, int, int]] = []
    seqs: list[tuple[int, int]] = []
    for b, bos, eos in seq_bounds:
        starts = range(bos, eos, chunk_size)
        seqs.append((len(chunks), len(starts)))
        chunks += [(b, s, min(chunk_size, eos - s)) for s in starts]
    return np.array(chunks, dtype=np.int64).reshape(-1, 3), np.array(seqs, dtype=np.int64).reshape(-1, 2)


class _ForwardStages(types.SimpleNamespace):
    """Device arrays left by :func:`_run_forward_stages` (float32 unless noted).

    chunks ``[NC, 3]`` and seqs ``[N, 2]`` (int64 tables), qn, kn ``[B, T, H, K]``, v ``[B, T, HV, V]``,
    G and beta ``[B, T, HV]``, Lmat and A ``[B, T, HV, C]``, w ``[B, T, HV, K]``, h ``[NC, HV, K, V]``
    (state at each chunk's start), delta ``[B, T, HV, V]``; ``rows`` is the trailing geometry of the
    per-row kernels and ``row_threads`` their thread count.
    """


def _run_forward_stages(p: GDNProblem, chunk_size: int, L: NumbaLauncher, ht: Any) -> _ForwardStages:
    """Launch every forward stage but the output, writing the final state into the device array `ht`."""
    xp = p.xp
    f32 = np.float32
    B, T, H, HV, K, V, N, C = p.B, p.T, p.H, p.HV, p.K, p.V, p.N, chunk_size
    kern = _kernels()

    def scratch(*shape: int) -> Any:
        return L.put(empty(xp, shape, f32))

    chunk_table, seq_table = chunk_tables(p.seq_bounds, C)
    NC = len(chunk_table)
    s = _ForwardStages(chunks=L.put(xp.asarray(chunk_table)), seqs=L.put(xp.asarray(seq_table)),
                       rows=(NC, C, HV, HV // H, K, V), row_threads=NC * HV * C)
    q, k = (L.put(x.astype(f32, copy=False)) for x in (p.q, p.k))
    s.v = L.put(p.v.astype(f32, copy=False))
    s.qn, s.kn = scratch(B, T, H, K), scratch(B, T, H, K)
    L.launch(kern.normalize_qk, B * T * H, q, k, s.qn, s.kn, B, T, H, K, p.use_qk_l2norm_in_kernel)

    g = L.put(p.g) if p.g is not None else L.dummy(3)
    beta = L.put(p.beta) if p.beta is not None else L.dummy(3)
    a_log = L.put(p.A_log) if p.A_log is not None else L.dummy(1)
    dt_bias = L.put(p.dt_bias) if p.dt_bias is not None else L.dummy(1)
    s.G, s.beta = scratch(B, T, HV), scratch(B, T, HV)
    L.launch(kern.gate_cumsum_and_beta, NC * HV, g, beta, a_log, dt_bias, s.chunks, s.G, s.beta, NC, HV,
             p.g is not None, p.beta is not None, p.use_gate_in_kernel, p.dt_bias is not None,
             p.use_beta_sigmoid_in_kernel, f32(2.0 if p.allow_neg_eigval else 1.0))

    s.Lmat, s.A = scratch(B, T, HV, C), scratch(B, T, HV, C)
    L.launch(kern.scaled_kkt, s.row_threads, s.kn, s.G, s.beta, s.chunks, s.Lmat, *s.rows)
    L.launch(kern.invert_unit_lower, s.row_threads, s.Lmat, s.chunks, s.A, *s.rows)
    s.w, u = scratch(B, T, HV, K), scratch(B, T, HV, V)
    L.launch(kern.wy_representation, s.row_threads, s.kn, s.v, s.G, s.beta, s.A, s.chunks, s.w, u, *s.rows)

    h0 = L.put(p.initial_state) if p.initial_state is not None else L.dummy(4)
    s.h, s.delta = scratch(NC, HV, K, V), scratch(B, T, HV, V)
    L.launch(kern.state_pass, N * HV * V, s.kn, s.G, s.w, u, h0, s.chunks, s.seqs, s.h, s.delta, ht,
             N, HV, HV // H, K, V, p.initial_state is not None)
    return s


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
        s = _run_forward_stages(p, chunk_size, L, L.out(ht))
        L.launch(_kernels().chunk_output, s.row_threads, s.qn, s.kn, s.G, s.h, s.delta, s.chunks, L.out(o), *s.rows,
                 np.float32(p.scale))
        L.finish()
    return o, ht


def chunk_backward(p: GDNProblem, chunk_size: int, do: Any, dht: Any) -> dict[str, Any]:
    """Gradients of the chunked gated delta rule in float32, chunk by chunk.

    Per chunk, with the forward's notation (module docstring), ``dh`` the gradient w.r.t. the chunk's end
    state and ``S0 = h[c]``:

    * ``d delta_s = scale sum_{r >= s} e^(G_r - G_s) (k_s . q_r) do_r + e^(G_last - G_s) dh^T k_s``; the
      start state's gradient ``e^G_last dh + scale sum_r e^G_r q_r do_r^T - w^T d delta`` is the previous
      chunk's dh (or dh0);
    * dq, dk and ``dw = -S0 d delta`` through the output and the state update (:func:`_kernels`,
      ``qkw_grads``);
    * through ``w = A X``, ``u = A Y``: ``dX = A^T dw``, ``dY = A^T d delta``,
      ``dL = -A^T strictly-lower(dw X^T + d delta Y^T) A^T``, then through ``X``, ``Y`` and ``L`` to k, v
      and beta;
    * the gate: G enters only through decay factors ``e^(G_a - G_j)`` (j = -1 for the chunk start,
      ``G_-1 = 0``), so each term's gradient w.r.t. its exponent is collected per pair (a, j) and
      ``dg_s`` (natural log, as G is a base-e cumsum) is the total over the pairs with ``a >= s > j``.
      This equals the peer's reverse cumsum of ``dG_t = q_t . dq_t - k_t . dk_t + ...`` within the chunk
      but never forms it: there, O(1) terms (the diagonal ``q_t . k_t``, ``<dh, S_end>``) cancel down to a
      dg that is tiny under strong decay, and in float32 that broke the gate tolerance at small K (dA_log
      4e-3 relative error against 3e-5 here, chunk 64 with the gate in kernel, K = 8).

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
    B, T, H, HV, K, V, N, C = p.B, p.T, p.H, p.HV, p.K, p.V, p.N, chunk_size
    kern = _kernels()
    with device_scope(p):
        L = NumbaLauncher(xp)

        def scratch(*shape: int) -> Any:
            return L.put(empty(xp, shape, f32))

        s = _run_forward_stages(p, C, L, scratch(N, HV, K, V))
        NC = s.rows[0]
        d_do = L.put(xp.asarray(do).astype(f32, copy=False))
        d_dht = L.put(xp.asarray(dht).astype(f32, copy=False)) if dht is not None else L.dummy(4)
        dq, dk = empty(xp, (B, T, HV, K), f32), empty(xp, (B, T, HV, K), f32)
        dv = empty(xp, (B, T, HV, V), f32)
        dbeta = empty(xp, (B, T, HV), f32)
        dg = empty(xp, (B, T, HV), f32) if p.g is not None else None
        dh0 = empty(xp, (N, HV, K, V), f32) if p.initial_state is not None else None
        d_dq, d_dk, d_dv = L.out(dq), L.out(dk), L.out(dv)
        d_dbeta = L.out(dbeta) if p.beta is not None else L.put(dbeta)
        d_dh0 = L.out(dh0) if dh0 is not None else L.dummy(4)
        ddelta, dh, dw = scratch(B, T, HV, V), scratch(NC, HV, K, V), scratch(B, T, HV, K)
        P, dL = scratch(B, T, HV, C), scratch(B, T, HV, C)
        # gradients w.r.t. the exponents of the decay factors: e^(G_a - G_j) in row a, column j + 1 (column 0:
        # the chunk start), and e^(G_last - G_a) in dexp_end[a]
        dexp, dexp_end = scratch(B, T, HV, C + 1), scratch(B, T, HV)
        scale = f32(p.scale)

        L.launch(kern.dv_local, s.row_threads, s.qn, s.kn, s.G, d_do, s.chunks, ddelta, *s.rows, scale)
        L.launch(kern.state_grad_pass, N * HV * V, s.qn, s.kn, s.G, s.w, d_do, d_dht, s.chunks, s.seqs, ddelta,
                 dh, d_dh0, N, HV, HV // H, K, V, scale, dht is not None, dh0 is not None)
        L.launch(kern.qkw_grads, s.row_threads, s.qn, s.kn, s.G, s.h, dh, s.delta, ddelta, d_do, s.chunks, d_dq,
                 d_dk, dw, dexp, dexp_end, *s.rows, scale)
        L.launch(kern.wy_bwd_inputs, s.row_threads, s.kn, s.v, s.G, s.beta, s.A, dw, ddelta, s.chunks, d_dk, d_dv,
                 d_dbeta, dexp, *s.rows)
        L.launch(kern.wy_bwd_dA_At, s.row_threads, s.kn, s.v, s.G, s.beta, s.A, dw, ddelta, s.chunks, P, *s.rows)
        L.launch(kern.wy_bwd_dL, s.row_threads, s.A, P, s.chunks, dL, *s.rows)
        L.launch(kern.kkt_bwd, s.row_threads, s.kn, s.G, s.beta, s.Lmat, dL, s.chunks, d_dk, d_dbeta, dexp,
                 *s.rows)
        if p.g is not None:
            L.launch(kern.gate_grad, s.row_threads, dexp, dexp_end, s.chunks, L.out(dg), *s.rows)
        L.finish()
    return _raw_input_grads(p, dq, dk, dv, dbeta, dg, dh0)


def _raw_input_grads(p: GDNProblem, dq: Any, dk: Any, dv: Any, dbeta: Any, dg: Any, dh0: Any) -> dict[str, Any]:
    """From the kernels' gradients (dq, dk ``[B, T, HV, K]`` w.r.t. q^, k^; dbeta, dg ``[B, T, HV]`` w.r.t. the
    effective beta and the log-decay) to the gradients w.r.t. the raw inputs, keyed like ``GatedDeltaRuleGrads``."""
    xp = p.xp
    f32 = np.float32
    dq, dk = qk_input_grads(p, dq, dk)
    grads: dict[str, Any] = dict.fromkeys(GatedDeltaRuleGrads._fields)
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
