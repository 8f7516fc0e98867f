"""Stages of the chunked algorithm shared by every family with a decayed linear state (float64 NumPy reference).

Each function works on ONE sequence: token-major arrays ``[T, H, K]`` (the ``[B, T, H, K]`` layout with the
batch row and the sequence's token range sliced out; H counts the heads that own a state, the value
heads for the gated delta rule), cut into chunks of ``chunk_size`` tokens, the last one possibly short.
The state ``S`` is ``[H, K, V]`` (row = key dimension), the output is ``o_t = scale · S_tᵀ q_t``.

Gate forms: the gate cumsum (:class:`ChunkGates`, from :func:`chunk_local_cumsum`) is either ``[T, H]`` (one
scalar gate per head: gated delta rule, Simple GLA) or ``[T, H, K]`` (one gate per key dimension: GLA). The form is
read from its shape; the state's row ``d`` is multiplied by ``2^{G_d}``. Gate gradients come back in the same form,
in natural-log units (see :func:`chunk_qk_grads`).

Extreme values. A gate whose decay is 0 (``-inf``, or ``exp(g) == 0`` in float64) is a hard reset: it is left out
of the cumsum and counted instead (:class:`ChunkGates`), and every decay across it is 0 by selection, so no
``-inf - (-inf)`` is formed and no huge finite gate absorbs the others of its chunk. Masks select (``np.where``), and
every product that may meet a NaN or an infinity is taken with :func:`mul0` / :func:`einsum0`, where a zero factor
gives 0 whatever the other holds: a structural zero of a triangular matrix in the forward, a zero cotangent in the
backward. So a NaN or an infinity at token t never reaches a row before t, nor, when the cotangents from t on are
zero, a gradient before t.

Forward: ``chunk_local_cumsum`` -> (family stage producing the values ``u`` and, for delta rules, ``w``)
-> ``state_pass_fwd`` -> ``chunk_output``. Backward: ``chunk_output_dv_local`` -> ``state_pass_bwd`` ->
``chunk_qk_grads`` -> (family stage) -> ``reverse_chunk_local_cumsum``. All arrays are float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..._arrays import empty

RCP_LN2 = 1.0 / math.log(2.0)


def chunk_slices(T: int, chunk_size: int) -> list[slice]:
    """The token ranges of the chunks of a sequence of T tokens (the last one may be short; none if T = 0)."""
    return [slice(s, min(s + chunk_size, T)) for s in range(0, T, chunk_size)]


def mul0(a: Any, b: Any) -> np.ndarray:
    """``a * b`` (broadcast), 0 wherever ``a`` or ``b`` is 0, even against a NaN or an infinity in the other."""
    with np.errstate(invalid="ignore", over="ignore"):
        ab = np.multiply(a, b)
        # Only a NaN product can differ (0 · inf, 0 · NaN): finite inputs keep the plain product.
        return np.where((a == 0) | (b == 0), 0.0, ab) if np.isnan(ab).any() else ab


def _expanded(x: np.ndarray, subscripts: str, full: str) -> np.ndarray:
    """`x` with axes `subscripts` laid out along `full` (missing axes of size 1)."""
    order = sorted(range(len(subscripts)), key=lambda i: full.index(subscripts[i]))
    shape = [x.shape[subscripts.index(c)] if c in subscripts else 1 for c in full]
    return np.transpose(x, order).reshape(shape)


def einsum0(subscripts: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.einsum(subscripts, a, b)`` of two operands whose every term ``a·b`` is :func:`mul0`'s: 0 where either
    factor is 0, even against a NaN or an infinity in the other. Operands that are both finite take np.einsum."""
    if np.isfinite(a).all() and np.isfinite(b).all():
        return np.einsum(subscripts, a, b, optimize=True)
    inputs, out = subscripts.split("->")
    sa, sb = inputs.split(",")
    full = sa + "".join(c for c in sb if c not in sa)
    return np.einsum(f"{full}->{out}", mul0(_expanded(a, sa, full), _expanded(b, sb, full)))


def is_reset(g: np.ndarray) -> np.ndarray:
    """Where a natural-log gate is a hard reset: ``-inf``, or any gate whose decay ``exp(g)`` is 0 in float64
    (``g < -745.13``). NaN and ``+inf`` are not resets."""
    with np.errstate(under="ignore"):
        return np.exp(g) == 0.0


@dataclasses.dataclass(frozen=True)
class ChunkGates:
    """The chunk-local cumsum of a natural-log gate with its hard resets taken out (:func:`chunk_local_cumsum`).

    Within a chunk, the decay from row j to row r >= j is 0 when a reset lies in ``(j, r]`` (``R_r > R_j``) and
    ``2^{G_r - G_j} = exp(Σ_{j < s ≤ r} g_s)`` otherwise; from the chunk's start to row r it is 0 when ``R_r > 0``
    and ``2^{G_r}`` otherwise. A reset never enters a difference, so none is ``-inf - (-inf)``, and a gate of -1e30
    does not absorb the others of its chunk.

    Attributes:
        G: base-2 inclusive cumsum of the gates that are not resets, restarting at every chunk: ``[T, H]`` (scalar
            form) or ``[T, H, K]`` (per key), float64.
        R: the number of resets in the chunk up to each row (inclusive), same shape, int64.
    """

    G: np.ndarray
    R: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.G.shape

    def __getitem__(self, index: Any) -> ChunkGates:
        return ChunkGates(self.G[index], self.R[index])

    def resets(self) -> np.ndarray:
        """Where the gate of a row is itself a reset (bool, G's shape). Rows must be whole chunks."""
        return np.diff(self.R, axis=0, prepend=0) > 0


def chunk_local_cumsum(g: np.ndarray, chunk_size: int) -> ChunkGates:
    """Base-2 chunk-local inclusive cumsum of a natural-log gate, resets taken out:
    ``G_r = (1/ln2) Σ_{s ≤ r, s in r's chunk, s not a reset} g_s`` and the running count of resets R.

    Args:
        g: natural-log gate ``[T, H]`` or ``[T, H, K]``, float64.
        chunk_size: tokens per chunk.

    Returns:
        :class:`ChunkGates`, G and R of g's shape.
    """
    reset = is_reset(g)
    steps = np.where(reset, 0.0, g)
    G = np.empty_like(g, dtype=np.float64)
    R = np.empty(g.shape, dtype=np.int64)
    for sl in chunk_slices(g.shape[0], chunk_size):
        G[sl] = np.cumsum(steps[sl], axis=0) * RCP_LN2
        R[sl] = np.cumsum(reset[sl], axis=0)
    return ChunkGates(G, R)


def reverse_chunk_local_cumsum(dG: np.ndarray, gates: ChunkGates, chunk_size: int) -> np.ndarray:
    """Gradient of the per-token gate from that of its chunk-local cumsum: ``dg_s = Σ dG_r`` over the rows
    ``r ≥ s`` of s's chunk with no reset in ``(s, r]``; 0 at a reset (its gate decays nothing that is kept).

    The rows past the next reset are left out because every decay factor there spans only rows past it: their
    dG sums to 0 exactly, and leaving them out keeps its rounding (or a NaN at a later token) out of dg_s.

    Args:
        dG: ``[T, H]`` or ``[T, H, K]``: the gradient w.r.t. the natural-log cumsum ``Γ = G · ln2``, which is
            what the identity-based formulas (:func:`chunk_qk_grads`, the family's own stage) produce. No ln2
            factor is applied: ``dg`` comes out in natural-log units, like the API's gate.
        gates: the forward's :func:`chunk_local_cumsum`.
        chunk_size: tokens per chunk.

    Returns:
        ``dg``, same shape, float64.
    """
    dg = np.empty_like(dG, dtype=np.float64)
    for sl in chunk_slices(dG.shape[0], chunk_size):
        R = gates.R[sl]
        n = R.shape[0]
        later = np.triu(np.ones((n, n), dtype=bool)).reshape((n, n) + (1,) * (R.ndim - 1))
        same = later & (R[:, None] == R[None, :])  # [s, r]
        dg[sl] = np.where(gates[sl].resets(), 0.0, np.where(same, dG[sl][None], 0.0).sum(axis=1))
    return dg


def _per_key(gates: ChunkGates, k: np.ndarray) -> ChunkGates:
    """The gates broadcastable against k ``[L, H, K]``: ``[L, H, 1]`` for the scalar form, ``[L, H, K]`` per key."""
    if gates.shape == k.shape:
        return gates
    if gates.shape == k.shape[:-1]:
        return gates[..., None]
    raise ValueError(f"gate cumsum must be [T, H] or [T, H, K] = {list(k.shape)}, got {list(gates.shape)}")


def _to_gate_form(x: np.ndarray, gates: ChunkGates) -> np.ndarray:
    """A per-key quantity ``[L, H, K]`` reduced to the gates' form (summed over K for the scalar form)."""
    return x if x.shape == gates.shape else x.sum(axis=-1)


def _exp2_where(keep: Any, x: np.ndarray) -> np.ndarray:
    """``2^x`` where `keep`, else exactly 0. The exponent is selected, so a dropped ``2^x`` that would overflow or be
    NaN is never formed."""
    with np.errstate(invalid="ignore"):
        return np.exp2(np.where(keep, x, -np.inf))


def causal_decay(gates: ChunkGates, strict: bool = False) -> np.ndarray:
    """Decays between the rows of one chunk: ``2^{G_r - G_j}`` for ``j ≤ r`` (``j < r`` if `strict`) with no reset in
    ``(j, r]``, else 0: ``[L, L, ...]`` indexed ``[r, j, ...]`` (G's trailing axes)."""
    n = gates.shape[0]
    causal = np.tril(np.ones((n, n), dtype=bool), -1 if strict else 0).reshape((n, n) + (1,) * (gates.G.ndim - 1))
    with np.errstate(invalid="ignore"):
        return _exp2_where(causal & (gates.R[:, None] == gates.R[None, :]), gates.G[:, None] - gates.G[None, :])


def decay_from_start(gates: ChunkGates) -> np.ndarray:
    """Decay from one chunk's start to each of its rows: ``2^{G_r}``, 0 after a reset; G's shape."""
    return _exp2_where(gates.R == 0, gates.G)


def _decay_to_end(gates: ChunkGates) -> np.ndarray:
    """Decay from each row of one chunk to its last row: ``2^{G_last - G_r}``, 0 before a later reset."""
    with np.errstate(invalid="ignore"):
        return _exp2_where(gates.R[-1] == gates.R, gates.G[-1] - gates.G)


def _decay_across(gates: ChunkGates) -> np.ndarray:
    """Decay of the state across one chunk: ``2^{G_last}``, 0 when the chunk holds a reset."""
    return _exp2_where(gates.R[-1] == 0, gates.G[-1])


def intra_chunk_scores(q: np.ndarray, k: np.ndarray, gates: ChunkGates) -> np.ndarray:
    """Decayed causal scores of one chunk: ``A_rj = Σ_d q_rd k_jd 2^{G_rd - G_jd}`` for ``j ≤ r``, else 0.

    Args:
        q, k: ``[L, H, K]``; gates: ``[L, H]`` or ``[L, H, K]`` (one chunk).

    Returns:
        ``A`` ``[H, L, L]`` indexed ``[h, r, j]``, float64 (unscaled).
    """
    A = np.sum(mul0(q[:, None] * k[None, :], causal_decay(_per_key(gates, k))), axis=-1)
    return A.transpose(2, 0, 1)


def state_pass_fwd(
    k: np.ndarray, u: np.ndarray, gates: ChunkGates, h0: np.ndarray, chunk_size: int, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inter-chunk state pass: the state at each chunk start, the values written, the final state.

    Per chunk c (rows r, ``G_last`` = G at the chunk's last row; the decays are :class:`ChunkGates`')::

        h[c] = S
        δ    = u − w S                     (δ = u without w)
        S    = 2^{G_last} ⊙ S + (k ⊙ 2^{G_last − G})ᵀ δ

    Args:
        k: keys ``[T, H, K]``.
        u: values entering the state ``[T, H, V]`` (the WY ``u`` of a delta rule; ``v`` for GLA).
        gates: gate cumsum ``[T, H]`` or ``[T, H, K]``.
        h0: initial state ``[H, K, V]``.
        chunk_size: tokens per chunk.
        w: the WY ``w`` ``[T, H, K]`` of a delta rule, or None.

    Returns:
        ``(h, delta, ht)``: chunk-start states ``[NC, H, K, V]``, the values written ``δ`` ``[T, H, V]``
        (ungated), the final state ``[H, K, V]`` (``h0`` when T = 0), all float64.
    """
    slices = chunk_slices(k.shape[0], chunk_size)
    h = empty(np, (len(slices),) + h0.shape, np.float64)
    delta = empty(np, u.shape, np.float64)
    S = np.array(h0, dtype=np.float64)
    for c, sl in enumerate(slices):
        h[c] = S
        d = u[sl] if w is None else u[sl] - einsum0("rhk,hkv->rhv", w[sl], S)
        delta[sl] = d
        gk = _per_key(gates[sl], k[sl])
        S = mul0(_decay_across(gk)[..., None], S) + einsum0("rhk,rhv->hkv", mul0(k[sl], _decay_to_end(gk)), d)
    return h, delta, S


def chunk_output(
    q: np.ndarray, k: np.ndarray, gates: ChunkGates, h: np.ndarray, delta: np.ndarray, scale: float,
    chunk_size: int
) -> np.ndarray:
    """Output stage: ``o_r = scale · [(q_r ⊙ 2^{G_r}) h[c] + Σ_{j ≤ r} A_rj δ_j]`` (A of :func:`intra_chunk_scores`).

    Args:
        q, k: ``[T, H, K]``; gates: ``[T, H]`` or ``[T, H, K]``; h: chunk-start states ``[NC, H, K, V]``;
        delta: values written ``[T, H, V]``; scale: query scale; chunk_size: tokens per chunk.

    Returns:
        o ``[T, H, V]`` float64.
    """
    o = empty(np, delta.shape, np.float64)
    for c, sl in enumerate(chunk_slices(q.shape[0], chunk_size)):
        qg = mul0(q[sl], decay_from_start(_per_key(gates[sl], k[sl])))
        A = intra_chunk_scores(q[sl], k[sl], gates[sl])
        o[sl] = scale * (einsum0("rhk,hkv->rhv", qg, h[c]) + einsum0("hrj,jhv->rhv", A, delta[sl]))
    return o


def chunk_output_dv_local(
    q: np.ndarray, k: np.ndarray, gates: ChunkGates, do: np.ndarray, scale: float, chunk_size: int
) -> np.ndarray:
    """Gradient of the intra-chunk output w.r.t. δ: ``dδ^loc_j = scale · Σ_{r ≥ j} A_rj do_r``.

    Args:
        q, k: ``[T, H, K]``; gates: ``[T, H]`` or ``[T, H, K]``; do: output cotangent ``[T, H, V]``;
        scale: query scale; chunk_size: tokens per chunk.

    Returns:
        ``dδ^loc`` ``[T, H, V]`` float64.
    """
    dd = empty(np, do.shape, np.float64)
    for sl in chunk_slices(q.shape[0], chunk_size):
        dd[sl] = scale * einsum0("hrj,rhv->jhv", intra_chunk_scores(q[sl], k[sl], gates[sl]), do[sl])
    return dd


def state_pass_bwd(
    q: np.ndarray,
    k: np.ndarray,
    gates: ChunkGates,
    do: np.ndarray,
    ddelta_local: np.ndarray,
    dht: np.ndarray,
    scale: float,
    chunk_size: int,
    w: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse state pass, last chunk first, with ``dS`` starting at ``dht``::

        dh[c] = dS                                              (gradient of the state at the END of chunk c)
        dδ    = dδ^loc + (k ⊙ 2^{G_last − G}) dS
        dS    = 2^{G_last} ⊙ dS + scale · (q ⊙ 2^{G})ᵀ do − wᵀ dδ     (no w term without w)

    Args:
        q, k: ``[T, H, K]``; gates: ``[T, H]`` or ``[T, H, K]``; do: output cotangent ``[T, H, V]``;
        ddelta_local: :func:`chunk_output_dv_local` ``[T, H, V]``; dht: final-state cotangent ``[H, K, V]``
        (zeros when there is none); scale: query scale; chunk_size: tokens per chunk; w: as in
        :func:`state_pass_fwd`.

    Returns:
        ``(dh, ddelta, dh0)``: ``[NC, H, K, V]`` end-of-chunk state gradients, the total gradient of δ
        ``[T, H, V]`` (that of u; that of v for GLA), the gradient of the initial state ``[H, K, V]``; float64.
    """
    slices = chunk_slices(q.shape[0], chunk_size)
    dh = empty(np, (len(slices),) + dht.shape, np.float64)
    ddelta = empty(np, ddelta_local.shape, np.float64)
    dS = np.array(dht, dtype=np.float64)
    for c in range(len(slices) - 1, -1, -1):
        sl = slices[c]
        dh[c] = dS
        gk = _per_key(gates[sl], k[sl])
        dd = ddelta_local[sl] + einsum0("rhk,hkv->rhv", mul0(k[sl], _decay_to_end(gk)), dS)
        ddelta[sl] = dd
        dS = mul0(_decay_across(gk)[..., None], dS) + scale * einsum0(
            "rhk,rhv->hkv", mul0(q[sl], decay_from_start(gk)), do[sl])
        if w is not None:
            dS = dS - einsum0("rhk,rhv->hkv", w[sl], dd)
    return dh, ddelta, dS


def chunk_qk_grads(
    q: np.ndarray,
    k: np.ndarray,
    gates: ChunkGates,
    h: np.ndarray,
    dh: np.ndarray,
    delta: np.ndarray,
    do: np.ndarray,
    scale: float,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of q, k and the gate cumsum through the output and the state update (δ held fixed).

    Per chunk (``dA_rj = scale · do_r·δ_j``, ``D_rj = 2^{G_r − G_j}`` for ``j ≤ r``, per key in that form)::

        dq_r  = scale · 2^{G_r} ⊙ (h do_r) + Σ_{j ≤ r} dA_rj D_rj ⊙ k_j
        dk_j  = Σ_{r ≥ j} dA_rj D_rj ⊙ q_r + dk^inter_j,   dk^inter_j = 2^{G_last − G_j} ⊙ (dh δ_j)
        dΓ_r  = q_r ⊙ dq_r − k_r ⊙ dk_r
        dΓ_last += 2^{G_last} ⊙ Σ_v (h ⊙ dh) + Σ_j k_j ⊙ dk^inter_j

    Every decay factor is an exponential of the gate, so each term's gate derivative is the term itself (0 for a
    factor dropped at a reset): these are gradients w.r.t. the natural-log cumsum ``Γ = G · ln2`` (natural-log
    units), ready for :func:`reverse_chunk_local_cumsum`.

    Args:
        q, k: ``[T, H, K]``; gates: ``[T, H]`` or ``[T, H, K]``; h: chunk-start states ``[NC, H, K, V]``;
        dh: end-of-chunk state gradients ``[NC, H, K, V]`` (:func:`state_pass_bwd`); delta: ``[T, H, V]``;
        do: ``[T, H, V]``; scale: query scale; chunk_size: tokens per chunk.

    Returns:
        ``(dq, dk, dG)``: ``[T, H, K]``, ``[T, H, K]`` and ``dG`` in the gates' form, float64.
    """
    dq = empty(np, q.shape, np.float64)
    dk = empty(np, k.shape, np.float64)
    dG = empty(np, gates.shape, np.float64)
    for c, sl in enumerate(chunk_slices(q.shape[0], chunk_size)):
        qc, kc = q[sl], k[sl]
        gk = _per_key(gates[sl], kc)
        dAD = mul0(scale * einsum0("rhv,jhv->rjh", do[sl], delta[sl])[..., None], causal_decay(gk))  # [r, j, H, K]
        dq_c = scale * mul0(decay_from_start(gk), einsum0("hkv,rhv->rhk", h[c], do[sl])) + np.sum(
            dAD * kc[None, :], axis=1)
        dk_inter = mul0(_decay_to_end(gk), einsum0("hkv,jhv->jhk", dh[c], delta[sl]))
        dk_c = np.sum(dAD * qc[:, None], axis=0) + dk_inter
        dGk = qc * dq_c - kc * dk_c
        dGk[-1] += mul0(_decay_across(gk), np.sum(mul0(h[c], dh[c]), axis=-1)) + np.sum(kc * dk_inter, axis=0)
        dq[sl], dk[sl], dG[sl] = dq_c, dk_c, _to_gate_form(dGk, gates[sl])
    return dq, dk, dG
