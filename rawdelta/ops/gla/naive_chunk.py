"""Float64 NumPy reference of the CHUNKED GLA, forward and backward: the ``numpy`` backend of ``chunk_gla`` and
``fused_chunk_gla``.

It follows the chunked algorithm stage by stage (README.md beside this file, "Chunked form") in float64, entirely
through the stages every family shares (``rawdelta/ops/common/chunk_stages.py``) with the per-key gate form and the
plain update rule (the values written are v itself): the base-2 chunk-local gate cumsum, the state pass, the output
stage and, backward, the intra-chunk output's gradient, the reverse state pass, the q/k/gate gradients and the
reverse chunk-local cumsum. Nothing is saved: the backward recomputes the chunk states.

Entry points: :func:`chunk_forward` / :func:`chunk_backward` on a validated problem, and the backend protocol's
:func:`forward` / :func:`backward` over them; the public ``naive_chunk_gla`` pair is generated from the op's
declaration (definition.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.chunk_stages import (
    chunk_local_cumsum,
    chunk_output,
    chunk_output_dv_local,
    chunk_qk_grads,
    reverse_chunk_local_cumsum,
    state_pass_bwd,
    state_pass_fwd,
)
from .naive import as_f64

if TYPE_CHECKING:
    from .definition import GLAProblem


def _sequence(p: GLAProblem, n: int) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray]:
    """Sequence n's bounds, q, k ``[T, H, K]``, v ``[T, H, V]``, g ``[T, H, K]`` and h0 ``[H, K, V]`` in float64."""
    b, s, e = p.seq_bounds[n]
    h0 = as_f64(p.initial_state[n]) if p.initial_state is not None else np.zeros((p.H, p.K, p.V))
    return (b, s, e), *(as_f64(x[b, s:e]) for x in (p.q, p.k, p.v, p.g)), h0


def chunk_forward(p: GLAProblem, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 forward of the chunked GLA (the chunked algorithm, not the token loop).

    Args:
        p: the validated call (any input dtypes; every input is cast to float64).
        chunk_size: tokens per chunk; chunks never cross a sequence, the last one of a sequence may be short.

    Returns:
        ``(o, ht)``: o ``[B, T, H, V]`` and the final state ``[N, H, K, V]`` (always computed), float64. An empty
        sequence's final state is its initial state (or zeros).
    """
    o = empty(np, (p.B, p.T, p.H, p.V), np.float64)
    ht = empty(np, (p.N, p.H, p.K, p.V), np.float64)
    for n in range(p.N):
        (b, s, e), q, k, v, g, h0 = _sequence(p, n)
        gates = chunk_local_cumsum(g, chunk_size)
        h, _, ht[n] = state_pass_fwd(k, v, gates, h0, chunk_size)
        o[b, s:e] = chunk_output(q, k, gates, h, v, p.scale, chunk_size)
    return o, ht


def chunk_backward(p: GLAProblem, chunk_size: int, do: Any, dht: Any = None) -> dict[str, np.ndarray | None]:
    """Float64 hand-written backward of the chunked GLA, stage by stage (README.md, "Chunked form").

    Args:
        p: the validated call of the forward.
        chunk_size: the forward's chunk size.
        do: cotangent of o ``[B, T, H, V]``.
        dht: cotangent of the final state ``[N, H, K, V]``, or None (zeros).

    Returns:
        Float64 gradients keyed ``q, k, v, g, gk, gv, initial_state`` (gk, gv always None; None for absent inputs).
    """
    do, dht = as_f64(do), as_f64(dht)
    dq, dk, dg = (empty(np, (p.B, p.T, p.H, p.K), np.float64) for _ in range(3))
    dv = empty(np, (p.B, p.T, p.H, p.V), np.float64)
    dh0 = empty(np, (p.N, p.H, p.K, p.V), np.float64)
    for n in range(p.N):
        (b, s, e), q, k, v, g, h0 = _sequence(p, n)
        do_n = do[b, s:e]
        # 1. Recompute the gate cumsum and the chunk-start states (the values written are v).
        gates = chunk_local_cumsum(g, chunk_size)
        h, _, _ = state_pass_fwd(k, v, gates, h0, chunk_size)
        # 2. dv from the intra-chunk output, then the reverse state pass (dh: end-of-chunk state gradients).
        dv_local = chunk_output_dv_local(q, k, gates, do_n, p.scale, chunk_size)
        dS_end = dht[n] if dht is not None else np.zeros((p.H, p.K, p.V))
        dh, dv[b, s:e], dh0[n] = state_pass_bwd(q, k, gates, do_n, dv_local, dS_end, p.scale, chunk_size)
        # 3. dq, dk and the gradient of the natural-log gate cumsum, then 4. the per-token gate gradient.
        dq[b, s:e], dk[b, s:e], dG = chunk_qk_grads(q, k, gates, h, dh, v, do_n, p.scale, chunk_size)
        dg[b, s:e] = reverse_chunk_local_cumsum(dG, gates, chunk_size)
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gk": None, "gv": None,
            "initial_state": dh0 if p.initial_state is not None else None}


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], None]:
    """The numpy backend's forward (the backend protocol): ``((o, ht), None)``, float64."""
    return chunk_forward(p, p.chunk_size), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, np.ndarray | None]:
    """The numpy backend's backward (the backend protocol): :func:`chunk_backward`."""
    return chunk_backward(p, p.chunk_size, do, dht)
