"""Float64 NumPy reference of the CHUNKED gated delta rule, forward and backward: the ``numpy`` backend of
``chunk_gated_delta_rule``.

It follows the chunked algorithm of the kernels stage by stage (README.md beside this file, "Chunked
form"), in float64 whatever the input dtypes: base-2 chunk-local gate cumsum, the WY representation
``A = (I + L)^{-1}`` per chunk, the inter-chunk state pass, the output stage; the backward is written
by hand in the same stages (nothing is saved: the per-chunk factors and states are recomputed). The
stages shared with other families live in ``rawdelta/ops/common/chunk_stages.py``; the WY stage is this
family's own. Input transforms and their backward are naive.py's.

Entry points: :func:`chunk_forward` / :func:`chunk_backward` on a validated problem, and the backend protocol's
:func:`forward` / :func:`backward` over them; the public ``naive_chunk_gated_delta_rule`` pair is generated from the
op's declaration (definition.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.chunk_stages import (
    ChunkGates,
    causal_decay,
    chunk_local_cumsum,
    chunk_output,
    chunk_output_dv_local,
    chunk_qk_grads,
    chunk_slices,
    decay_from_start,
    einsum0,
    mul0,
    reverse_chunk_local_cumsum,
    state_pass_bwd,
    state_pass_fwd,
)
from .naive import Inputs, as_f64, finish_grads, prepare_inputs, sequence_initial_state

if TYPE_CHECKING:
    from .definition import GDNProblem


@dataclass
class _Sequence:
    """One sequence's inputs after the in-kernel transforms, token-major, float64."""

    q: np.ndarray  # [T, HV, K] (key heads expanded to value heads)
    k: np.ndarray  # [T, HV, K]
    v: np.ndarray  # [T, HV, V]
    beta: np.ndarray  # [T, HV] (ones when absent)
    G: ChunkGates  # [T, HV] base-2 chunk-local cumsum of the log decay, resets taken out (zeros without a gate)
    h0: np.ndarray  # [HV, K, V]


def _sequence(p: GDNProblem, x: Inputs, n: int, chunk_size: int) -> _Sequence:
    b, s, e = p.seq_bounds[n]
    g = x.g[b, s:e] if x.g is not None else np.zeros((e - s, p.HV))
    return _Sequence(q=x.q[b, s:e], k=x.k[b, s:e], v=x.v[b, s:e], beta=x.beta[b, s:e, :, 0],
                     G=chunk_local_cumsum(g, chunk_size), h0=sequence_initial_state(p, x, n))


def _unit_lower_inverse(L: np.ndarray) -> np.ndarray:
    """``(I + L)^{-1}`` per head for strictly lower-triangular L ``[HV, n, n]``, by forward substitution.

    Row i of the inverse: ``A_i = e_i − Σ_{j < i} L_ij A_j``.
    """
    n = L.shape[-1]
    A = np.zeros_like(L)
    for i in range(n):
        A[:, i, i] = 1.0
        A[:, i, :i] = -einsum0("hj,hjm->hm", L[:, i, :i], A[:, :i, :i])
    return A


@dataclass
class _WYChunk:
    """One chunk's WY factors (matrices head-major ``[HV, L, L]``, indexed ``[h, row, col]``)."""

    kk: np.ndarray  # k_i . k_j
    E: np.ndarray  # 2^{G_i - G_j} strictly below the diagonal with no reset in (j, i], 0 elsewhere
    L: np.ndarray  # beta_i kk_ij E_ij
    A: np.ndarray  # (I + L)^{-1}
    gamma: np.ndarray  # 2^G from the chunk's start (0 after a reset)  [L, HV]
    kb: np.ndarray  # beta 2^G k  [L, HV, K]
    vb: np.ndarray  # beta v  [L, HV, V]


def _wy_chunk(k: np.ndarray, v: np.ndarray, beta: np.ndarray, gates: ChunkGates) -> _WYChunk:
    """The WY factors of one chunk from k ``[L, HV, K]``, v ``[L, HV, V]``, beta ``[L, HV]``, gates ``[L, HV]``."""
    kk = np.einsum("ihk,jhk->hij", k, k)
    E = causal_decay(gates, strict=True).transpose(2, 0, 1)
    L = mul0(beta.T[:, :, None], kk * E)
    gamma = decay_from_start(gates)
    return _WYChunk(kk=kk, E=E, L=L, A=_unit_lower_inverse(L), gamma=gamma, kb=mul0(beta, gamma)[..., None] * k,
                    vb=beta[..., None] * v)


def _wy_representation(x: _Sequence, chunk_size: int) -> tuple[list[_WYChunk], np.ndarray, np.ndarray]:
    """Per chunk ``w = A (beta 2^G k)``, ``u = A (beta v)``: the factors, w ``[T, HV, K]`` and u ``[T, HV, V]``."""
    chunks, w, u = [], empty(np, x.k.shape, np.float64), empty(np, x.v.shape, np.float64)
    for sl in chunk_slices(x.k.shape[0], chunk_size):
        f = _wy_chunk(x.k[sl], x.v[sl], x.beta[sl], x.G[sl])
        w[sl] = einsum0("hrj,jhk->rhk", f.A, f.kb)
        u[sl] = einsum0("hrj,jhv->rhv", f.A, f.vb)
        chunks.append(f)
    return chunks, w, u


def _wy_backward(
    f: _WYChunk, k: np.ndarray, v: np.ndarray, beta: np.ndarray, dw: np.ndarray, du: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of one chunk's ``w = A kb``, ``u = A vb``, ``A = (I + L)^{-1}``, ``L_ij = beta_i kk_ij E_ij``.

    Args:
        f: the chunk's factors; k ``[L, HV, K]``, v ``[L, HV, V]``, beta ``[L, HV]``; dw ``[L, HV, K]`` and
            du ``[L, HV, V]``: the gradients of w and u.

    Returns:
        ``(dk, dv, dbeta, dG)`` through this stage: ``[L, HV, K]``, ``[L, HV, V]``, ``[L, HV]``, ``[L, HV]``;
        dG is w.r.t. the natural-log cumsum (each factor's gate derivative is the factor itself).
    """
    n = f.A.shape[-1]
    dkb = einsum0("hrj,rhk->jhk", f.A, dw)  # Aᵀ dw
    dvb = einsum0("hrj,rhv->jhv", f.A, du)  # Aᵀ du
    strict = np.tril(np.ones((n, n), dtype=bool), -1)
    # Only the strictly lower part of dA reaches L (A is unit lower triangular); the rest may hold 0 · NaN.
    dA = np.where(strict, einsum0("rhk,jhk->hrj", dw, f.kb) + einsum0("rhv,jhv->hrj", du, f.vb), 0.0)
    # A = M^{-1} with M = I + L: δA = −A δM A, so dL = −Aᵀ dA Aᵀ, of which only the strictly lower part is free.
    dL = -np.where(strict, einsum0("hmj,hjn->hmn", einsum0("hmi,hmj->hij", f.A, dA), f.A.transpose(0, 2, 1)), 0.0)
    dLbE = mul0(dL, mul0(beta.T[:, :, None], f.E))  # ∂L_ij/∂(k_i.k_j) = beta_i E_ij
    dLL = mul0(dL, f.L)  # ∂L_ij/∂Γ_i = −∂L_ij/∂Γ_j = L_ij

    dk = (mul0(mul0(beta, f.gamma)[..., None], dkb) + np.einsum("hij,jhk->ihk", dLbE, k)
          + np.einsum("hij,ihk->jhk", dLbE, k))
    dv = mul0(beta[..., None], dvb)
    dbeta = (mul0(f.gamma, np.sum(dkb * k, axis=-1)) + np.sum(dvb * v, axis=-1)
             + np.sum(mul0(dL, f.kk * f.E), axis=-1).T)
    dG = np.sum(mul0(dkb, f.kb), axis=-1) + (np.sum(dLL, axis=-1) - np.sum(dLL, axis=-2)).T
    return dk, dv, dbeta, dG


def chunk_forward(p: GDNProblem, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 forward of the chunked gated delta rule (the chunked algorithm, not the token loop).

    Args:
        p: the validated call (any input dtypes; every input is cast to float64).
        chunk_size: tokens per chunk; chunks never cross a sequence, the last one of a sequence may be short.

    Returns:
        ``(o, ht)``: o ``[B, T, HV, V]`` and the final state ``[N, HV, K, V]`` (always computed), float64.
        An empty sequence's final state is its initial state (or zeros).
    """
    x = prepare_inputs(p)
    o = empty(np, (p.B, p.T, p.HV, p.V), np.float64)
    ht = empty(np, (p.N, p.HV, p.K, p.V), np.float64)
    for n, (b, s, e) in enumerate(p.seq_bounds):
        sq = _sequence(p, x, n, chunk_size)
        _, w, u = _wy_representation(sq, chunk_size)
        h, delta, ht[n] = state_pass_fwd(sq.k, u, sq.G, sq.h0, chunk_size, w=w)
        o[b, s:e] = chunk_output(sq.q, sq.k, sq.G, h, delta, p.scale, chunk_size)
    return o, ht


def chunk_backward(p: GDNProblem, chunk_size: int, do: Any, dht: Any = None) -> dict[str, np.ndarray | None]:
    """Float64 hand-written backward of the chunked gated delta rule, stage by stage (README.md, "Chunked form").

    Args:
        p: the validated call of the forward.
        chunk_size: the forward's chunk size.
        do: cotangent of o ``[B, T, HV, V]``.
        dht: cotangent of the final state ``[N, HV, K, V]``, or None (zeros).

    Returns:
        Float64 gradients keyed ``q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias`` (gk, gv always None;
        None for absent inputs), w.r.t. the raw inputs like :func:`~.naive.recurrent_backward`.
    """
    x = prepare_inputs(p)
    do, dht = as_f64(do), as_f64(dht)
    B, T, HV, K, V = p.B, p.T, p.HV, p.K, p.V
    dq = empty(np, (B, T, HV, K), np.float64)
    dk = empty(np, (B, T, HV, K), np.float64)
    dv = empty(np, (B, T, HV, V), np.float64)
    dbeta = empty(np, (B, T, HV, 1), np.float64)
    dg = empty(np, (B, T, HV), np.float64)
    dh0 = empty(np, (p.N, HV, K, V), np.float64)

    for n, (b, s, e) in enumerate(p.seq_bounds):
        sq = _sequence(p, x, n, chunk_size)
        do_n = do[b, s:e]
        # 1. Recompute the WY representation, the chunk-start states h and the values written δ.
        wy, w, u = _wy_representation(sq, chunk_size)
        h, delta, _ = state_pass_fwd(sq.k, u, sq.G, sq.h0, chunk_size, w=w)
        # 2-3. dδ from the intra-chunk output, then the reverse state pass (dh: end-of-chunk state gradients).
        dd_local = chunk_output_dv_local(sq.q, sq.k, sq.G, do_n, p.scale, chunk_size)
        dS_end = dht[n] if dht is not None else np.zeros((HV, K, V))
        dh, ddelta, dh0[n] = state_pass_bwd(sq.q, sq.k, sq.G, do_n, dd_local, dS_end, p.scale, chunk_size, w=w)
        # 4. dq, dk, dG through the output and the state update (δ fixed).
        dq_n, dk_n, dG_n = chunk_qk_grads(sq.q, sq.k, sq.G, h, dh, delta, do_n, p.scale, chunk_size)
        # 5. WY backward: δ = u − w h[c], so du = dδ and dw = −dδ h[c]ᵀ.
        for c, sl in enumerate(chunk_slices(e - s, chunk_size)):
            dw = -einsum0("rhv,hkv->rhk", ddelta[sl], h[c])
            dk_wy, dv[b, s + sl.start:s + sl.stop], db_wy, dG_wy = _wy_backward(
                wy[c], sq.k[sl], sq.v[sl], sq.beta[sl], dw, ddelta[sl])
            dk_n[sl] += dk_wy
            dG_n[sl] += dG_wy
            dbeta[b, s + sl.start:s + sl.stop, :, 0] = db_wy
        dq[b, s:e], dk[b, s:e] = dq_n, dk_n
        # 6. Per-token natural-log gate gradient.
        dg[b, s:e] = reverse_chunk_local_cumsum(dG_n, sq.G, chunk_size)

    return finish_grads(p, x, dq, dk, dv, dbeta, dg if x.g is not None else None, None, None, dh0)


def forward(p: GDNProblem, workspace: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], None]:
    """The numpy backend's forward (the backend protocol): ``((o, ht), None)``, float64."""
    return chunk_forward(p, p.chunk_size), None


def backward(p: GDNProblem, saved: Any, do: Any, dht: Any) -> dict[str, np.ndarray | None]:
    """The numpy backend's backward (the backend protocol): :func:`chunk_backward`."""
    return chunk_backward(p, p.chunk_size, do, dht)
