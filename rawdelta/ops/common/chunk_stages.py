"""Stages of the chunked algorithm shared by every family with a decayed linear state (float64 NumPy reference).

Each function works on ONE sequence: token-major arrays ``[T, H, K]`` (the ``[B, T, H, K]`` layout with the
batch row and the sequence's token range sliced out; H counts the heads that own a state, the value
heads for the gated delta rule), cut into chunks of ``chunk_size`` tokens, the last one possibly short.
The state ``S`` is ``[H, K, V]`` (row = key dimension), the output is ``o_t = scale · S_tᵀ q_t``.

Gate forms: ``G`` is the base-2 chunk-local cumsum of :func:`chunk_local_cumsum`, either ``[T, H]`` (one
scalar gate per head: gated delta rule, Simple GLA) or ``[T, H, K]`` (one gate per key dimension: GLA).
The form is read from ``G``'s shape; the state's row ``d`` is multiplied by ``2^{G_d}``. Gate gradients
come back in the same form, in natural-log units (see :func:`chunk_qk_grads`).

Forward: ``chunk_local_cumsum`` -> (family stage producing the values ``u`` and, for delta rules, ``w``)
-> ``state_pass_fwd`` -> ``chunk_output``. Backward: ``chunk_output_dv_local`` -> ``state_pass_bwd`` ->
``chunk_qk_grads`` -> (family stage) -> ``reverse_chunk_local_cumsum``. All arrays are float64.
"""

from __future__ import annotations

import math

import numpy as np

from ..._arrays import empty

RCP_LN2 = 1.0 / math.log(2.0)


def chunk_slices(T: int, chunk_size: int) -> list[slice]:
    """The token ranges of the chunks of a sequence of T tokens (the last one may be short; none if T = 0)."""
    return [slice(s, min(s + chunk_size, T)) for s in range(0, T, chunk_size)]


def chunk_local_cumsum(g: np.ndarray, chunk_size: int) -> np.ndarray:
    """Base-2 chunk-local inclusive cumsum of a natural-log gate: ``G_r = (1/ln2) Σ_{s ≤ r, s in r's chunk} g_s``.

    Args:
        g: natural-log gate ``[T, H]`` or ``[T, H, K]``, float64.
        chunk_size: tokens per chunk.

    Returns:
        ``G``, same shape, float64; ``2^{G_r - G_s} = exp(Σ_{s < t ≤ r} g_t)`` within a chunk.
    """
    G = np.empty_like(g, dtype=np.float64)
    for sl in chunk_slices(g.shape[0], chunk_size):
        G[sl] = np.cumsum(g[sl], axis=0) * RCP_LN2
    return G


def reverse_chunk_local_cumsum(dG: np.ndarray, chunk_size: int) -> np.ndarray:
    """Gradient of the per-token gate from that of its chunk-local cumsum: ``dg_s = Σ_{r ≥ s in s's chunk} dG_r``.

    Args:
        dG: ``[T, H]`` or ``[T, H, K]``: the gradient w.r.t. the natural-log cumsum ``Γ = G · ln2``, which is
            what the identity-based formulas (:func:`chunk_qk_grads`, the family's own stage) produce. No ln2
            factor is applied: ``dg`` comes out in natural-log units, like the API's gate.
        chunk_size: tokens per chunk.

    Returns:
        ``dg``, same shape, float64.
    """
    dg = np.empty_like(dG, dtype=np.float64)
    for sl in chunk_slices(dG.shape[0], chunk_size):
        dg[sl] = np.cumsum(dG[sl][::-1], axis=0)[::-1]
    return dg


def _per_key(G: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``G`` broadcastable against k ``[L, H, K]``: ``[L, H, 1]`` for the scalar form, ``[L, H, K]`` per key."""
    if G.shape == k.shape:
        return G
    if G.shape == k.shape[:-1]:
        return G[..., None]
    raise ValueError(f"gate cumsum must be [T, H] or [T, H, K] = {list(k.shape)}, got {list(G.shape)}")


def _to_gate_form(x: np.ndarray, G: np.ndarray) -> np.ndarray:
    """A per-key quantity ``[L, H, K]`` reduced to ``G``'s form (summed over K for the scalar form)."""
    return x if x.shape == G.shape else x.sum(axis=-1)


def _causal_decay(Gk: np.ndarray) -> np.ndarray:
    """``2^{G_r - G_j}`` for ``j ≤ r``, 0 above the diagonal: ``[L, L, H, 1|K]`` indexed ``[r, j]``."""
    L = Gk.shape[0]
    causal = np.tril(np.ones((L, L), dtype=bool))[:, :, None, None]
    # Mask the exponent, not the result: 2^{G_r - G_j} with j > r can overflow.
    return np.exp2(np.where(causal, Gk[:, None] - Gk[None, :], -np.inf))


def intra_chunk_scores(q: np.ndarray, k: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Decayed causal scores of one chunk: ``A_rj = Σ_d q_rd k_jd 2^{G_rd - G_jd}`` for ``j ≤ r``, else 0.

    Args:
        q, k: ``[L, H, K]``; G: ``[L, H]`` or ``[L, H, K]`` (one chunk).

    Returns:
        ``A`` ``[H, L, L]`` indexed ``[h, r, j]``, float64 (unscaled).
    """
    A = np.sum(q[:, None] * k[None, :] * _causal_decay(_per_key(G, k)), axis=-1)
    return A.transpose(2, 0, 1)


def state_pass_fwd(
    k: np.ndarray, u: np.ndarray, G: np.ndarray, h0: np.ndarray, chunk_size: int, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inter-chunk state pass: the state at each chunk start, the values written, the final state.

    Per chunk c (rows r, ``G_last`` = G at the chunk's last row)::

        h[c] = S
        δ    = u − w S                     (δ = u without w)
        S    = 2^{G_last} ⊙ S + (k ⊙ 2^{G_last − G})ᵀ δ

    Args:
        k: keys ``[T, H, K]``.
        u: values entering the state ``[T, H, V]`` (the WY ``u`` of a delta rule; ``v`` for GLA).
        G: gate cumsum ``[T, H]`` or ``[T, H, K]``.
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
        d = u[sl] if w is None else u[sl] - np.einsum("rhk,hkv->rhv", w[sl], S)
        delta[sl] = d
        Gk = _per_key(G[sl], k[sl])
        G_last = Gk[-1]
        S = np.exp2(G_last)[..., None] * S + np.einsum("rhk,rhv->hkv", k[sl] * np.exp2(G_last - Gk), d)
    return h, delta, S


def chunk_output(
    q: np.ndarray, k: np.ndarray, G: np.ndarray, h: np.ndarray, delta: np.ndarray, scale: float, chunk_size: int
) -> np.ndarray:
    """Output stage: ``o_r = scale · [(q_r ⊙ 2^{G_r}) h[c] + Σ_{j ≤ r} A_rj δ_j]`` (A of :func:`intra_chunk_scores`).

    Args:
        q, k: ``[T, H, K]``; G: ``[T, H]`` or ``[T, H, K]``; h: chunk-start states ``[NC, H, K, V]``;
        delta: values written ``[T, H, V]``; scale: query scale; chunk_size: tokens per chunk.

    Returns:
        o ``[T, H, V]`` float64.
    """
    o = empty(np, delta.shape, np.float64)
    for c, sl in enumerate(chunk_slices(q.shape[0], chunk_size)):
        qg = q[sl] * np.exp2(_per_key(G[sl], k[sl]))
        A = intra_chunk_scores(q[sl], k[sl], G[sl])
        o[sl] = scale * (np.einsum("rhk,hkv->rhv", qg, h[c]) + np.einsum("hrj,jhv->rhv", A, delta[sl]))
    return o


def chunk_output_dv_local(
    q: np.ndarray, k: np.ndarray, G: np.ndarray, do: np.ndarray, scale: float, chunk_size: int
) -> np.ndarray:
    """Gradient of the intra-chunk output w.r.t. δ: ``dδ^loc_j = scale · Σ_{r ≥ j} A_rj do_r``.

    Args:
        q, k: ``[T, H, K]``; G: ``[T, H]`` or ``[T, H, K]``; do: output cotangent ``[T, H, V]``;
        scale: query scale; chunk_size: tokens per chunk.

    Returns:
        ``dδ^loc`` ``[T, H, V]`` float64.
    """
    dd = empty(np, do.shape, np.float64)
    for sl in chunk_slices(q.shape[0], chunk_size):
        dd[sl] = scale * np.einsum("hrj,rhv->jhv", intra_chunk_scores(q[sl], k[sl], G[sl]), do[sl])
    return dd


def state_pass_bwd(
    q: np.ndarray,
    k: np.ndarray,
    G: np.ndarray,
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
        q, k: ``[T, H, K]``; G: ``[T, H]`` or ``[T, H, K]``; do: output cotangent ``[T, H, V]``;
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
        Gk = _per_key(G[sl], k[sl])
        G_last = Gk[-1]
        dd = ddelta_local[sl] + np.einsum("rhk,hkv->rhv", k[sl] * np.exp2(G_last - Gk), dS)
        ddelta[sl] = dd
        dS = np.exp2(G_last)[..., None] * dS + scale * np.einsum("rhk,rhv->hkv", q[sl] * np.exp2(Gk), do[sl])
        if w is not None:
            dS = dS - np.einsum("rhk,rhv->hkv", w[sl], dd)
    return dh, ddelta, dS


def chunk_qk_grads(
    q: np.ndarray,
    k: np.ndarray,
    G: np.ndarray,
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

    Every decay factor is an exponential of the gate, so each term's gate derivative is the term itself:
    these are gradients w.r.t. the natural-log cumsum ``Γ = G · ln2`` (natural-log units), ready for
    :func:`reverse_chunk_local_cumsum`.

    Args:
        q, k: ``[T, H, K]``; G: ``[T, H]`` or ``[T, H, K]``; h: chunk-start states ``[NC, H, K, V]``;
        dh: end-of-chunk state gradients ``[NC, H, K, V]`` (:func:`state_pass_bwd`); delta: ``[T, H, V]``;
        do: ``[T, H, V]``; scale: query scale; chunk_size: tokens per chunk.

    Returns:
        ``(dq, dk, dG)``: ``[T, H, K]``, ``[T, H, K]`` and ``dG`` in G's form, float64.
    """
    dq = empty(np, q.shape, np.float64)
    dk = empty(np, k.shape, np.float64)
    dG = empty(np, G.shape, np.float64)
    for c, sl in enumerate(chunk_slices(q.shape[0], chunk_size)):
        qc, kc = q[sl], k[sl]
        Gk = _per_key(G[sl], kc)
        G_last = Gk[-1]
        dAD = scale * np.einsum("rhv,jhv->rjh", do[sl], delta[sl])[..., None] * _causal_decay(Gk)  # [r, j, H, K]
        dq_c = scale * np.exp2(Gk) * np.einsum("hkv,rhv->rhk", h[c], do[sl]) + np.sum(dAD * kc[None, :], axis=1)
        dk_inter = np.exp2(G_last - Gk) * np.einsum("hkv,jhv->jhk", dh[c], delta[sl])
        dk_c = np.sum(dAD * qc[:, None], axis=0) + dk_inter
        dGk = qc * dq_c - kc * dk_c
        dGk[-1] += np.exp2(G_last) * np.sum(h[c] * dh[c], axis=-1) + np.sum(kc * dk_inter, axis=0)
        dq[sl], dk[sl], dG[sl] = dq_c, dk_c, _to_gate_form(dGk, G[sl])
    return dq, dk, dG
