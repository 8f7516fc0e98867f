"""Stages of the chunked algorithm shared by every family with a decayed linear state: Numba CUDA reference kernels.

The float32 counterpart of chunk_stages.py (same stage names and formulas), one kernel per stage, without
tensor cores. Per sequence and state head (the value head ``hv``; key head ``hv // group``), the tokens are
cut into chunks of ``C`` rows that never cross a sequence start (:func:`chunk_tables`). In a chunk with start
state ``S0`` ``[K, V]``, rows ``r = 0 .. n-1`` and ``G_r`` the chunk-local inclusive cumsum of the log-decay:

* ``δ = u − w S0`` (delta rule) or ``δ = u`` (plain), ``S_end = e^G_last ⊙ S0 + Σ_r (e^(G_last − G_r) ⊙ k_r) δ_rᵀ``;
* ``o_r = scale ((e^G_r ⊙ q_r)ᵀ S0 + Σ_{j ≤ r} (q_r · (e^(G_r − G_j) ⊙ k_j)) δ_j)``.

Gates stay in base e (the cumsum is of the natural-log decay, every factor is ``exp``), so gate gradients need
no ln 2 conversion; every kept factor has a non-positive exponent for ``g <= 0``.

Extreme values (chunk_stages.py has the same rules in float64): a gate whose float32 decay is 0 (``-inf``, or
``g <= RESET_GATE``) is a hard reset, left out of the cumsum G and counted in R (``[B, T, HV, lanes]``, like G), so
the decay from row j to row a is 0 when ``R_a > R_j`` and ``e^(G_a − G_j)`` otherwise (from the chunk's start: 0
when ``R_a > 0``); a dropped factor is skipped by a branch, never multiplied by 0. The products run over the causal
rows only, and every backward term whose cotangent is 0 is skipped, so a NaN or an infinity at token t never reaches a
row before t, nor, when the cotangents from t on are zero, a gradient before t.

The family's choices are the two arguments of :func:`chunk_stage_kernels` (compile-time, like template
parameters):

* gate form (:data:`GATE_FORMS`): ``"scalar"``, one log-decay per token and state head (gated delta rule,
  Simple GLA), or ``"per_key"``, one per key dimension (GLA). The kernels see a gate as *lanes*, the groups
  of key dimensions that share one decay: one lane of all K keys for a scalar gate, K lanes of one key for a
  per-key gate (:func:`gate_functions`). Gate-shaped arrays carry a trailing lane axis: the cumsum G and the
  gate gradient dg are ``[B, T, HV, lanes]``, lanes 1 or K.
* update rule (:data:`UPDATE_RULES`): ``"plain"``, ``S += k uᵀ`` with the values ``u`` as given (v for GLA),
  or ``"delta"``, the WY form of a delta rule, where the values written are ``δ = u − w S0`` with the
  family's ``w`` ``[B, T, HV, K]`` and ``u`` ``[B, T, HV, V]``; the backward then also gives dw.

Forward: (family: the per-step log-decay) → ``chunk_local_cumsum`` → (delta rule, family: ``L``,
``invert_unit_lower``, w and u) → ``state_pass_fwd`` → ``chunk_output``. Backward: ``chunk_output_dv_local`` →
``state_pass_bwd`` → ``chunk_qk_grads`` → (delta rule, family: the gradient dA of ``A = (I + L)^-1``,
``invert_unit_lower_bwd``, the backward through L) → ``gate_grad``.

Gate gradient: G enters only through decay factors ``e^(G_a − G_j)`` (``j = −1`` for the chunk start,
``G_−1 = 0``), so the stages collect the gradient w.r.t. each factor's exponent per pair (a, j), and
``dg_s`` (natural log) is the total over the pairs with ``a >= s > j``. Per lane: ``dexp``
``[B, T, HV, C + 1, lanes]`` holds row a's pairs, column ``j + 1`` (column 0: the chunk start, ``e^G_a``), and
``dexp_end`` ``[B, T, HV, lanes]`` the chunk-end factor ``e^(G_last − G_a)``; family kernels add their own
pairs to dexp. This equals the reverse cumsum of ``dG_t = q_t ⊙ dq_t − k_t ⊙ dk_t + ...`` (chunk_stages.py)
but never forms it: there O(1) terms cancel down to a dg that is tiny under strong decay, which float32
cannot resolve.

Shapes: q, k ``[B, T, H, K]``; token-indexed buffers ``[B, T, HV, ...]`` (the gate cumsum G and its reset
counts R ``[B, T, HV, lanes]``); per-chunk matrices (L, A and their
gradients) ``[B, T, HV, C]`` with row r at its token; per-chunk states h, dh ``[NC, HV, K, V]``; the tables
``chunks`` ``[NC, 3]`` and ``seqs`` ``[N, 2]`` (int64). All float32. :class:`NumbaChunkStages` launches the
stages of one call.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import numpy as np

from .backend import numba_cuda
from .numba_device import MAX_K, device_helpers
from .numba_launch import NumbaLauncher

GATE_FORMS = ("scalar", "per_key")
UPDATE_RULES = ("plain", "delta")
MAX_CHUNK = 64  # rows per chunk; a row of a chunk's dA is a local array of this size in the triangular inverse backward
RESET_GATE = math.log(2.0 ** -150)
"""A natural-log gate at or below this (about -103.97) is a hard reset: its float32 decay ``exp(g)`` rounds to 0."""

# numba.cuda, bound by the factories below; kernels must reach it as a module global (numba_device.py says why).
cuda: Any = None


def chunk_tables(seq_bounds: list[tuple[int, int, int]], chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk table and the sequence table of a call, built on the host.

    Args:
        seq_bounds: ``(batch row, first token, end token)`` per sequence (the problem's ``seq_bounds``).
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


@functools.cache
def gate_functions(gate_form: str) -> Any:
    """Compile (lazily, once per form) the device functions through which kernels apply a gate's decay; returns a
    namespace. A lane's keys are ``first, end = (lane, lane + 1) if per_key else (0, K)`` and key i's lane is
    ``i if per_key else 0`` (written inline in the kernels: a device call costs the CUDA simulator more than the
    work).

    * ``decayed_dot(coef, x, b, tx, hx, y, ty, hy, G, R, ta, tz, hv, K)``:
      ``coef Σ_i x[b, tx, hx, i] y[b, ty, hy, i] e^(G[b, ta, hv, lane(i)] − G[b, tz, hv, lane(i)])``, the decay
      taken once per lane (so once for a scalar gate);
    * ``add_decayed(y, b, ty, x, tx, hx, G, R, ta, tz, hv, K, coef, weight)``:
      ``y[b, ty, hv, i] += coef e^(G[b, ta, hv, lane(i)] − G[b, tz, hv, lane(i)]) weight x[b, tx, hx, i]`` for
      every key i; nothing when the weight (a cotangent) is 0;
    * ``read_state(coef, x, b, t, hx, h, c, hv, j, G, R, K)``: ``coef Σ_i e^(G[b, t, hv, lane(i)]) x[b, t, hx, i]
      h[c, hv, i, j]``, column j of the state ``h`` ``[NC, HV, K, V]`` read by the decayed row x.

    A lane's decay between rows ta >= tz is 0 when ``R[b, ta, hv, lane] != R[b, tz, hv, lane]`` (a reset between
    them), and its decay from the chunk's start to row t is 0 when ``R[b, t, hv, lane] > 0``: those lanes are
    skipped.
    """
    if gate_form not in GATE_FORMS:
        raise ValueError(f"gate_form must be one of {GATE_FORMS}, got {gate_form!r}")
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    zero = f32(0.0)
    per_key = gate_form == "per_key"
    dot = device_helpers().dot

    @cuda.jit(device=True)
    def decayed_dot(coef, x, b, tx, hx, y, ty, hy, G, R, ta, tz, hv, K):
        acc = zero
        for lane in range(K if per_key else 1):
            if R[b, ta, hv, lane] == R[b, tz, hv, lane]:
                first, end = (lane, lane + 1) if per_key else (0, K)
                acc += coef * dot(x, b, tx, hx, y, ty, hy, first, end) * math.exp(
                    G[b, ta, hv, lane] - G[b, tz, hv, lane])
        return acc

    @cuda.jit(device=True)
    def add_decayed(y, b, ty, x, tx, hx, G, R, ta, tz, hv, K, coef, weight):
        if weight == zero:
            return
        for lane in range(K if per_key else 1):
            if R[b, ta, hv, lane] == R[b, tz, hv, lane]:
                first, end = (lane, lane + 1) if per_key else (0, K)
                e = coef * math.exp(G[b, ta, hv, lane] - G[b, tz, hv, lane]) * weight
                for i in range(first, end):
                    y[b, ty, hv, i] += e * x[b, tx, hx, i]

    @cuda.jit(device=True)
    def read_state(coef, x, b, t, hx, h, c, hv, j, G, R, K):
        acc = zero
        for lane in range(K if per_key else 1):
            if R[b, t, hv, lane] == zero:
                first, end = (lane, lane + 1) if per_key else (0, K)
                xh = zero
                for i in range(first, end):
                    xh += x[b, t, hx, i] * h[c, hv, i, j]
                acc += coef * math.exp(G[b, t, hv, lane]) * xh
        return acc

    return types.SimpleNamespace(decayed_dot=decayed_dot, add_decayed=add_decayed, read_state=read_state)


@functools.cache
def chunk_stage_kernels(gate_form: str, update_rule: str) -> Any:
    """Compile (lazily, once per gate form and update rule) the shared stage kernels; returns a namespace of them.

    Per-row kernels end with the geometry ``n_chunks, C, HV, group, K, V`` (group = HV // H) and run one thread
    per (chunk, state head, row); per-column kernels (the state passes) one per (sequence, state head, state
    column). The module docstring gives the shapes and the gate-gradient layout.
    """
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")
    gate = gate_functions(gate_form)
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    one = f32(1.0)
    zero = f32(0.0)
    per_key = gate_form == "per_key"
    delta_rule = update_rule == "delta"
    dev = device_helpers()
    column_thread, load_column, store_column, chunk_row, dot, dot0 = (
        dev.column_thread, dev.load_column, dev.store_column, dev.chunk_row, dev.dot, dev.dot0)
    reset_gate = f32(RESET_GATE)
    decayed_dot, add_decayed, read_state = gate.decayed_dot, gate.add_decayed, gate.read_state

    # ---- forward -------------------------------------------------------------------------------------

    def chunk_local_cumsum(g, chunks, G, R, n_chunks, HV, K):
        """Per (chunk, state head, lane): G = the chunk-local inclusive cumsum of the log-decay g with its resets
        (``g <= RESET_GATE``, -inf included) left out, and R = the resets so far in the chunk (G may be g)."""
        tid = cuda.grid(1)
        n_lanes = K if per_key else 1
        if tid >= n_chunks * HV * n_lanes:
            return
        lane = tid % n_lanes
        hv = (tid // n_lanes) % HV
        c = tid // (n_lanes * HV)
        b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        acc = zero
        resets = zero
        for r in range(n_rows):
            x = g[b, t0 + r, hv, lane]
            if x <= reset_gate:
                resets += one
            else:
                acc += x
            G[b, t0 + r, hv, lane] = acc
            R[b, t0 + r, hv, lane] = resets

    def invert_unit_lower(Lmat, chunks, Amat, n_chunks, C, HV, group, K, V):
        """Column ``col`` of ``A = (I + L)^-1`` (L strictly lower) by forward substitution of ``(I + L) a = e_col``."""
        c, hv, _, b, t0, n_rows, col, _ = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if col >= n_rows:
            return
        for i in range(n_rows):
            a = one if i == col else zero
            for j in range(col, i):
                a -= Lmat[b, t0 + i, hv, j] * Amat[b, t0 + j, hv, col]
            Amat[b, t0 + i, hv, col] = a

    def state_pass_fwd(k, G, R, w, u, h0, chunks, seqs, h, delta, ht, n_seq, HV, group, K, V, has_h0):
        """Per (sequence, state head, state column j), over the sequence's chunks in order: the start state
        ``h[c]``, the values written δ ``[B, T, HV, V]``, and the final state ``ht`` ``[N, HV, K, V]``."""
        n, hv, hk, j = column_thread(cuda.grid(1), HV, V, group)
        if n >= n_seq:
            return
        S = cuda.local.array(MAX_K, f32)
        load_column(S, h0, n, hv, j, K, has_h0)
        for c in range(seqs[n, 0], seqs[n, 0] + seqs[n, 1]):
            b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            store_column(h, S, c, hv, j, K)
            for r in range(n_rows):
                t = t0 + r
                if delta_rule:
                    ws = zero
                    for i in range(K):
                        ws += w[b, t, hv, i] * S[i]
                    delta[b, t, hv, j] = u[b, t, hv, j] - ws
                else:
                    delta[b, t, hv, j] = u[b, t, hv, j]
            t_last = t0 + n_rows - 1
            for i in range(K):
                lane = i if per_key else 0
                g_last, r_last = G[b, t_last, hv, lane], R[b, t_last, hv, lane]
                acc = math.exp(g_last) * S[i] if r_last == zero else zero
                for r in range(n_rows):
                    t = t0 + r
                    if R[b, t, hv, lane] == r_last:
                        acc += math.exp(g_last - G[b, t, hv, lane]) * k[b, t, hk, i] * delta[b, t, hv, j]
                S[i] = acc
        store_column(ht, S, n, hv, j, K)

    def chunk_output(q, k, G, R, h, delta, chunks, o, n_chunks, C, HV, group, K, V, scale):
        """Row r of ``o = scale ((e^G_r ⊙ q_r)ᵀ h[c] + Σ_{s <= r} (q_r · (e^(G_r − G_s) ⊙ k_s)) δ_s)``
        ``[B, T, HV, V]``."""
        c, hv, hk, b, t0, n_rows, r, tr = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if r >= n_rows:
            return
        for j in range(V):
            o[b, tr, hv, j] = read_state(scale, q, b, tr, hk, h, c, hv, j, G, R, K)
        for s in range(r + 1):
            ts = t0 + s
            a = decayed_dot(scale, q, b, tr, hk, k, ts, hk, G, R, tr, ts, hv, K)
            for j in range(V):
                o[b, tr, hv, j] += a * delta[b, ts, hv, j]

    # ---- backward ------------------------------------------------------------------------------------

    def chunk_output_dv_local(q, k, G, R, do, chunks, ddelta, n_chunks, C, HV, group, K, V, scale):
        """Row s of the intra-chunk output's gradient w.r.t. δ:
        ``dδ_s = scale Σ_{r >= s} (k_s · (e^(G_r − G_s) ⊙ q_r)) do_r`` ``[B, T, HV, V]``."""
        c, hv, hk, b, t0, n_rows, s, ts = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if s >= n_rows:
            return
        for j in range(V):
            ddelta[b, ts, hv, j] = zero
        for r in range(s, n_rows):
            tr = t0 + r
            a = decayed_dot(scale, k, b, ts, hk, q, tr, hk, G, R, tr, ts, hv, K)
            for j in range(V):
                dout = do[b, tr, hv, j]
                if dout != zero:
                    ddelta[b, ts, hv, j] += a * dout

    def state_pass_bwd(q, k, G, R, w, do, dht, chunks, seqs, ddelta, dh, dh0, n_seq, HV, group, K, V, scale,
                       has_dht, has_h0):
        """Per (sequence, state head, column j), chunks in reverse: ``dh[c]`` (gradient w.r.t. the state at the
        chunk's end), ``dδ_s += (e^(G_last − G_s) ⊙ k_s)ᵀ dS``, then the gradient w.r.t. the chunk's start state
        ``dS = e^G_last ⊙ dS + scale Σ_r (e^G_r ⊙ q_r) do_rᵀ (− wᵀ dδ for the delta rule)``; dh0 at the end."""
        n, hv, hk, j = column_thread(cuda.grid(1), HV, V, group)
        if n >= n_seq:
            return
        dS = cuda.local.array(MAX_K, f32)
        load_column(dS, dht, n, hv, j, K, has_dht)
        for c in range(seqs[n, 0] + seqs[n, 1] - 1, seqs[n, 0] - 1, -1):
            b, t0, n_rows = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            t_last = t0 + n_rows - 1
            store_column(dh, dS, c, hv, j, K)
            for s in range(n_rows):
                ts = t0 + s
                acc = zero
                for lane in range(K if per_key else 1):
                    first, end = (lane, lane + 1) if per_key else (0, K)
                    kd = zero
                    for i in range(first, end):
                        kd += k[b, ts, hk, i] * dS[i]
                    if kd != zero and R[b, ts, hv, lane] == R[b, t_last, hv, lane]:
                        acc += math.exp(G[b, t_last, hv, lane] - G[b, ts, hv, lane]) * kd
                ddelta[b, ts, hv, j] += acc
            for i in range(K):
                lane = i if per_key else 0
                across = dS[i] != zero and R[b, t_last, hv, lane] == zero
                acc = math.exp(G[b, t_last, hv, lane]) * dS[i] if across else zero
                for r in range(n_rows):
                    tr = t0 + r
                    dout = do[b, tr, hv, j]
                    x = zero
                    if dout != zero and R[b, tr, hv, lane] == zero:
                        x = scale * math.exp(G[b, tr, hv, lane]) * q[b, tr, hk, i] * dout
                    if delta_rule:
                        dd = ddelta[b, tr, hv, j]
                        if dd != zero:
                            x = x - w[b, tr, hv, i] * dd
                    acc += x
                dS[i] = acc
        if has_h0:
            store_column(dh0, dS, n, hv, j, K)

    def chunk_qk_grads(q, k, G, R, h, dh, delta, ddelta, do, chunks, dq, dk, dw, dexp, dexp_end,
                       n_chunks, C, HV, group, K, V, scale):
        """Row a of the gradients through the output and the state update (δ held fixed), per state head
        ``[B, T, HV, K]``: ``dq_a = scale (e^G_a ⊙ h do_a + Σ_{j <= a} (do_a · δ_j) e^(G_a − G_j) ⊙ k_j)``,
        ``dk_a = e^(G_last − G_a) ⊙ dh δ_a + scale Σ_{r >= a} (do_r · δ_a) e^(G_r − G_a) ⊙ q_r``, for the delta
        rule ``dw_a = −h dδ_a``; and the gradients w.r.t. the exponents of the decay factors these terms carry:
        row a of dexp (``e^G_a``, ``e^(G_a − G_j)``, and ``e^G_last`` on the last row) and ``dexp_end[a]``
        (``e^(G_last − G_a)``)."""
        c, hv, hk, b, t0, n_rows, a, ta = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if a >= n_rows:
            return
        t_last = t0 + n_rows - 1
        n_lanes = K if per_key else 1
        for i in range(K):
            lane = i if per_key else 0
            g_a, r_a = G[b, ta, hv, lane], R[b, ta, hv, lane]
            h_do = zero
            dh_delta = zero
            h_ddelta = zero
            for j in range(V):
                dout = do[b, ta, hv, j]
                if dout != zero:
                    h_do += h[c, hv, i, j] * dout
                dhj = dh[c, hv, i, j]
                if dhj != zero:
                    dh_delta += dhj * delta[b, ta, hv, j]
                if delta_rule:
                    ddj = ddelta[b, ta, hv, j]
                    if ddj != zero:
                        h_ddelta += h[c, hv, i, j] * ddj
            dq[b, ta, hv, i] = scale * math.exp(g_a) * h_do if h_do != zero and r_a == zero else zero
            to_end = dh_delta != zero and r_a == R[b, t_last, hv, lane]
            dk[b, ta, hv, i] = math.exp(G[b, t_last, hv, lane] - g_a) * dh_delta if to_end else zero
            if delta_rule:
                dw[b, ta, hv, i] = -h_ddelta
        for lane in range(n_lanes):
            first, end = (lane, lane + 1) if per_key else (0, K)
            dexp[b, ta, hv, 0, lane] = dot(q, b, ta, hk, dq, ta, hv, first, end)
            dexp_end[b, ta, hv, lane] = dot(k, b, ta, hk, dk, ta, hv, first, end)
        if a == n_rows - 1:
            for lane in range(n_lanes):
                first, end = (lane, lane + 1) if per_key else (0, K)
                h_dh = zero
                for i in range(first, end):
                    for j in range(V):
                        dhj = dh[c, hv, i, j]
                        if dhj != zero:
                            h_dh += h[c, hv, i, j] * dhj
                if h_dh != zero and R[b, t_last, hv, lane] == zero:
                    dexp[b, ta, hv, 0, lane] += math.exp(G[b, t_last, hv, lane]) * h_dh
        for s in range(a + 1):
            ts = t0 + s
            do_delta = dot0(do, b, ta, hv, delta, ts, hv, 0, V)
            add_decayed(dq, b, ta, k, ts, hk, G, R, ta, ts, hv, K, scale, do_delta)
            for lane in range(n_lanes):
                first, end = (lane, lane + 1) if per_key else (0, K)
                e = zero
                if do_delta != zero and R[b, ta, hv, lane] == R[b, ts, hv, lane]:
                    e = scale * math.exp(G[b, ta, hv, lane] - G[b, ts, hv, lane]) * do_delta
                dexp[b, ta, hv, s + 1, lane] = e * dot(q, b, ta, hk, k, ts, hk, first, end)
        for r in range(a, n_rows):
            tr = t0 + r
            add_decayed(dk, b, ta, q, tr, hk, G, R, tr, ta, hv, K, scale, dot0(do, b, tr, hv, delta, ta, hv, 0, V))

    def invert_unit_lower_bwd_dA_At(dA, Amat, chunks, P, n_chunks, C, HV, group, K, V):
        """Row i of ``P = dA Aᵀ`` ``[B, T, HV, C]``, dA the gradient w.r.t. ``A = (I + L)^-1``, strictly lower
        (A is unit lower triangular: only its strictly lower part depends on L)."""
        c, hv, _, b, t0, n_rows, i, ti = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if i >= n_rows:
            return
        dA_row = cuda.local.array(MAX_CHUNK, f32)
        for m in range(i):
            dA_row[m] = dA[b, ti, hv, m]
        for j in range(n_rows):
            acc = zero
            for m in range(min(i, j + 1)):
                if dA_row[m] != zero:
                    acc += dA_row[m] * Amat[b, t0 + j, hv, m]
            P[b, ti, hv, j] = acc

    def invert_unit_lower_bwd_dL(Amat, P, chunks, dL, n_chunks, C, HV, group, K, V):
        """Row i of the gradient w.r.t. L, ``dL = −Aᵀ P`` ``[B, T, HV, C]``, strictly lower part only."""
        c, hv, _, b, t0, n_rows, i, _ = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if i >= n_rows:
            return
        for j in range(i):
            acc = zero
            for m in range(i, n_rows):
                pm = P[b, t0 + m, hv, j]
                if pm != zero:
                    acc += Amat[b, t0 + m, hv, i] * pm
            dL[b, t0 + i, hv, j] = -acc

    def gate_grad(dexp, dexp_end, chunks, dg, n_chunks, C, HV, group, K, V):
        """Row s of the gradient w.r.t. the log-decay g ``[B, T, HV, lanes]`` (natural log). Every decay factor is
        ``e^(G_a − G_j)`` with ``G_a − G_j = g_(j+1) + ... + g_a``, so g_s gets the exponent gradients of the
        factors spanning step s (``a >= s > j``): the chunk-start factors of rows a >= s, the pairs
        ``j < s <= a`` in rows a >= s, and the chunk-end factors of rows j < s."""
        c, hv, _, b, t0, n_rows, s, _ = chunk_row(cuda.grid(1), chunks, n_chunks, C, HV, group)
        if s >= n_rows:
            return
        for lane in range(K if per_key else 1):
            acc = zero
            for a in range(s, n_rows):
                for col in range(s + 1):  # column 0 is the chunk start, column j + 1 is row j < s
                    acc += dexp[b, t0 + a, hv, col, lane]
            for j in range(s):
                acc += dexp_end[b, t0 + j, hv, lane]
            dg[b, t0 + s, hv, lane] = acc

    kernels = {f.__name__: cuda.jit(f) for f in (
        chunk_local_cumsum, invert_unit_lower, state_pass_fwd, chunk_output, chunk_output_dv_local, state_pass_bwd,
        chunk_qk_grads, invert_unit_lower_bwd_dA_At, invert_unit_lower_bwd_dL, gate_grad)}
    return types.SimpleNamespace(**kernels)


class NumbaChunkStages:
    """The chunk geometry of one call on the device, and launches of the shared stage kernels.

    Arrays passed in are device arrays (:class:`NumbaLauncher` ``put``/``out``/``scratch``), shaped as in the module
    docstring; optional ones may be None.

    Attributes:
        chunks: the chunk table ``[NC, 3]`` on the device (int64; :func:`chunk_tables`).
        seqs: the sequence table ``[N, 2]`` on the device (int64).
        n_chunks: NC.
        lanes: gate lanes, 1 (scalar gate) or K (per-key gate).
        rows: the trailing geometry ``(NC, C, HV, group, K, V)`` of per-row kernels (the family's too).
        row_threads: the thread count of a per-row kernel, ``NC * HV * C``.
        column_threads: the thread count of a per-column kernel (the state passes), ``N * HV * V``.
    """

    def __init__(self, L: NumbaLauncher, seq_bounds: list[tuple[int, int, int]], chunk_size: int, H: int, HV: int,
                 K: int, V: int, gate_form: str, update_rule: str) -> None:
        """Build the chunk tables of a call and put them on the device.

        Args:
            L: the call's launcher.
            seq_bounds: ``(batch row, first token, end token)`` per sequence.
            chunk_size: rows per chunk (C).
            H, HV, K, V: key heads, state (value) heads, key and value dimensions.
            gate_form: one of :data:`GATE_FORMS`.
            update_rule: one of :data:`UPDATE_RULES`.
        """
        if chunk_size > MAX_CHUNK:
            raise ValueError(f"the Numba chunk stages take at most {MAX_CHUNK} rows per chunk, got {chunk_size}")
        self.kernels = chunk_stage_kernels(gate_form, update_rule)
        self.delta_rule = update_rule == "delta"
        self.L = L
        chunk_table, seq_table = chunk_tables(seq_bounds, chunk_size)
        self.chunks, self.seqs = L.put(L.xp.asarray(chunk_table)), L.put(L.xp.asarray(seq_table))
        self.n_chunks, self.n_seqs = len(chunk_table), len(seq_table)
        self.lanes = K if gate_form == "per_key" else 1
        self.rows = (self.n_chunks, chunk_size, HV, HV // H, K, V)
        self.row_threads = self.n_chunks * HV * chunk_size
        self.column_threads = self.n_seqs * HV * V
        self._columns = (self.n_seqs, HV, HV // H, K, V)

    def _or_dummy(self, x: Any) -> Any:
        """The device array `x`, or a 4-D dummy for an absent one."""
        return self.L.dummy(4) if x is None else x

    def _rule_array(self, x: Any) -> Any:
        """`x` (w or dw: the delta rule's), or a dummy under the plain rule."""
        assert (x is not None) == self.delta_rule, "w and dw go with the delta rule, and only with it"
        return self._or_dummy(x)

    def chunk_local_cumsum(self, g: Any, G: Any, R: Any) -> None:
        """G ``[B, T, HV, lanes]``: chunk-local inclusive cumsum of the per-step log-decay g (same shape; may be G)
        with its resets left out, and R ``[B, T, HV, lanes]``: the resets so far in each chunk."""
        NC, _, HV, _, K, _ = self.rows
        self.L.launch(self.kernels.chunk_local_cumsum, NC * HV * self.lanes, g, self.chunks, G, R, NC, HV, K)

    def invert_unit_lower(self, Lmat: Any, A: Any) -> None:
        """``A = (I + L)^-1`` per chunk, ``[B, T, HV, C]``, from the strictly lower L."""
        self.L.launch(self.kernels.invert_unit_lower, self.row_threads, Lmat, self.chunks, A, *self.rows)

    def state_pass_fwd(self, k: Any, G: Any, R: Any, u: Any, h0: Any, h: Any, delta: Any, ht: Any,
                       w: Any = None) -> None:
        """The chunk-start states h ``[NC, HV, K, V]``, the values written δ ``[B, T, HV, V]`` and the final state
        ht ``[N, HV, K, V]``, from k ``[B, T, H, K]``, the gate cumsum G and its resets R, u ``[B, T, HV, V]``, h0
        ``[N, HV, K, V]`` (None: zeros) and the delta rule's w ``[B, T, HV, K]``."""
        self.L.launch(self.kernels.state_pass_fwd, self.column_threads, k, G, R, self._rule_array(w), u,
                      self._or_dummy(h0), self.chunks, self.seqs, h, delta, ht, *self._columns, h0 is not None)

    def chunk_output(self, q: Any, k: Any, G: Any, R: Any, h: Any, delta: Any, o: Any, scale: float) -> None:
        """o ``[B, T, HV, V]`` from q, k ``[B, T, H, K]``, the chunk-start states h and the values written δ."""
        self.L.launch(self.kernels.chunk_output, self.row_threads, q, k, G, R, h, delta, self.chunks, o, *self.rows,
                      np.float32(scale))

    def chunk_output_dv_local(self, q: Any, k: Any, G: Any, R: Any, do: Any, ddelta: Any, scale: float) -> None:
        """ddelta ``[B, T, HV, V]`` = the intra-chunk output's gradient w.r.t. δ, from do ``[B, T, HV, V]``."""
        self.L.launch(self.kernels.chunk_output_dv_local, self.row_threads, q, k, G, R, do, self.chunks, ddelta,
                      *self.rows, np.float32(scale))

    def state_pass_bwd(self, q: Any, k: Any, G: Any, R: Any, do: Any, dht: Any, ddelta: Any, dh: Any, dh0: Any,
                       scale: float, w: Any = None) -> None:
        """Reverse state pass: dh ``[NC, HV, K, V]`` (w.r.t. each chunk's end state), ddelta completed to the total
        gradient of δ, and dh0 ``[N, HV, K, V]`` (None: not wanted), from dht ``[N, HV, K, V]`` (None: zeros)."""
        self.L.launch(self.kernels.state_pass_bwd, self.column_threads, q, k, G, R, self._rule_array(w), do,
                      self._or_dummy(dht), self.chunks, self.seqs, ddelta, dh, self._or_dummy(dh0), *self._columns,
                      np.float32(scale), dht is not None, dh0 is not None)

    def chunk_qk_grads(self, q: Any, k: Any, G: Any, R: Any, h: Any, dh: Any, delta: Any, ddelta: Any, do: Any,
                       dq: Any, dk: Any, dexp: Any, dexp_end: Any, scale: float, dw: Any = None) -> None:
        """dq, dk ``[B, T, HV, K]`` (per state head), the delta rule's dw ``[B, T, HV, K]``, and the exponent
        gradients dexp ``[B, T, HV, C + 1, lanes]``, dexp_end ``[B, T, HV, lanes]``. dq, dk and dexp are written,
        not added to: the family's kernels that add to them run after."""
        self.L.launch(self.kernels.chunk_qk_grads, self.row_threads, q, k, G, R, h, dh, delta, ddelta, do, self.chunks,
                      dq, dk, self._rule_array(dw), dexp, dexp_end, *self.rows, np.float32(scale))

    def invert_unit_lower_bwd(self, A: Any, dA: Any, P: Any, dL: Any) -> None:
        """dL ``[B, T, HV, C]`` (strictly lower) from dA, the gradient w.r.t. ``A = (I + L)^-1`` (strictly lower
        part read); P ``[B, T, HV, C]`` is work space."""
        self.L.launch(self.kernels.invert_unit_lower_bwd_dA_At, self.row_threads, dA, A, self.chunks, P, *self.rows)
        self.L.launch(self.kernels.invert_unit_lower_bwd_dL, self.row_threads, A, P, self.chunks, dL, *self.rows)

    def gate_grad(self, dexp: Any, dexp_end: Any, dg: Any) -> None:
        """dg ``[B, T, HV, lanes]``, the gradient w.r.t. the per-step log-decay, from the exponent gradients."""
        self.L.launch(self.kernels.gate_grad, self.row_threads, dexp, dexp_end, self.chunks, dg, *self.rows)
