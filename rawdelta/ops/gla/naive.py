"""Float64 NumPy reference of the recurrent GLA, forward and backward: the ``numpy`` backend of ``fused_recurrent_gla``.

Everything is computed in float64 whatever the input dtypes, token by token, vectorised over heads and the
``K x V`` state. The backward is written by hand (reverse mode) and keeps every per-step state: this is the
reference, memory is not a concern. The math is in README.md beside this file.

Entry points: :func:`recurrent_forward` / :func:`recurrent_backward` on a validated problem, and the backend
protocol's :func:`forward` / :func:`backward` over them; the public ``naive_recurrent_gla`` pair is generated from
the op's declaration (definition.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.chunk_stages import mul0

if TYPE_CHECKING:
    from .definition import GLAProblem


def as_f64(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def token_order(s: int, e: int, reverse: bool) -> range:
    """The tokens of a sequence ``[s, e)`` in the order the recurrence visits them."""
    return range(e - 1, s - 1, -1) if reverse else range(s, e)


def _decay(p: GLAProblem, b: int, t: int) -> np.ndarray | float:
    """``D_t = exp(gk_t)[:, None] * exp(gv_t)[None, :]`` per head ``[H, K, V]`` (broadcastable; 1.0 without gates)."""
    d: np.ndarray | float = 1.0
    if p.gk is not None:
        d = np.exp(as_f64(p.gk[b, t]))[:, :, None]
    if p.gv is not None:
        d = d * np.exp(as_f64(p.gv[b, t]))[:, None, :]
    return d


def _states(p: GLAProblem, n: int) -> tuple[list[np.ndarray], range, int]:
    """Sequence n's states ``[H, K, V]`` before each visited token and after the last, its token order and row."""
    b, s, e = p.seq_bounds[n]
    S = as_f64(p.initial_state[n]) if p.initial_state is not None else np.zeros((p.H, p.K, p.V))
    order = token_order(s, e, p.reverse)
    states = [S]
    for t in order:
        # a reset (decay 0) discards the state even where it holds an infinity, as the chunked form's selection does
        S = mul0(_decay(p, b, t), S) + as_f64(p.k[b, t])[:, :, None] * as_f64(p.v[b, t])[:, None, :]
        states.append(S)
    return states, order, b


def recurrent_forward(p: GLAProblem) -> tuple[np.ndarray, np.ndarray]:
    """Float64 forward of the recurrent GLA.

    Args:
        p: the validated call (any input dtypes; every input is cast to float64).

    Returns:
        ``(o, ht)``: o ``[B, T, H, V]`` and the final state ``[N, H, K, V]`` (always computed), float64. An empty
        sequence's final state is its initial state (or zeros).
    """
    o = empty(np, (p.B, p.T, p.H, p.V), np.float64)
    ht = empty(np, (p.N, p.H, p.K, p.V), np.float64)
    q = as_f64(p.q)
    for n in range(p.N):
        states, order, b = _states(p, n)
        for i, t in enumerate(order):
            o[b, t] = p.scale * np.einsum("hk,hkv->hv", q[b, t], states[i + 1])
        ht[n] = states[-1]
    return o, ht


def recurrent_backward(p: GLAProblem, do: Any, dht: Any = None) -> dict[str, np.ndarray | None]:
    """Float64 reverse-mode backward of the recurrent GLA (states recomputed and all kept).

    Per visited token t, last first, with ``dS`` (the gradient of the state after t) starting at ``dht``::

        dS  += scale q_t do_tᵀ ;  dq_t = scale S_t do_t ;  dk_t = dS v_t ;  dv_t = dSᵀ k_t
        Z    = dS ⊙ (D_t ⊙ S_prev) ;  dgk_t = Z 1_V ;  dgv_t = 1_Kᵀ Z
        dS   = D_t ⊙ dS

    Args:
        p: the validated call of the forward.
        do: cotangent of o ``[B, T, H, V]``.
        dht: cotangent of the final state ``[N, H, K, V]``, or None (zeros).

    Returns:
        Float64 gradients keyed ``q, k, v, g, gk, gv, initial_state`` (``g`` always None; None for absent inputs).
    """
    q, k, v, do = as_f64(p.q), as_f64(p.k), as_f64(p.v), as_f64(do)
    dq, dk, dv = (empty(np, x.shape, np.float64) for x in (q, k, v))
    dgk = None if p.gk is None else empty(np, p.gk.shape, np.float64)
    dgv = None if p.gv is None else empty(np, p.gv.shape, np.float64)
    dh0 = empty(np, (p.N, p.H, p.K, p.V), np.float64)
    for n in range(p.N):
        states, order, b = _states(p, n)
        dS = as_f64(dht[n]) if dht is not None else np.zeros((p.H, p.K, p.V))
        for i in range(len(order) - 1, -1, -1):
            t = order[i]
            dS = dS + p.scale * q[b, t][:, :, None] * do[b, t][:, None, :]
            dq[b, t] = p.scale * np.einsum("hkv,hv->hk", states[i + 1], do[b, t])
            dk[b, t] = np.einsum("hkv,hv->hk", dS, v[b, t])
            dv[b, t] = np.einsum("hkv,hk->hv", dS, k[b, t])
            D = _decay(p, b, t)
            # A zero cotangent meets the decay here at a token past a NaN or an infinity (or at a reset): mul0 keeps
            # it zero, so nothing from that token reaches the earlier ones.
            Z = mul0(dS, mul0(D, states[i]))
            if dgk is not None:
                dgk[b, t] = Z.sum(axis=2)
            if dgv is not None:
                dgv[b, t] = Z.sum(axis=1)
            dS = mul0(D, dS)
        dh0[n] = dS
    return {"q": dq, "k": dk, "v": dv, "g": None, "gk": dgk, "gv": dgv,
            "initial_state": dh0 if p.initial_state is not None else None}


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], None]:
    """The numpy backend's forward (the backend protocol): ``((o, ht), None)``, float64."""
    return recurrent_forward(p), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, np.ndarray | None]:
    """The numpy backend's backward (the backend protocol): :func:`recurrent_backward`."""
    return recurrent_backward(p, do, dht)
