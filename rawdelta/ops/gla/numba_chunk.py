"""The ``numba`` backend of the chunked GLA (``chunk_gla`` and ``fused_chunk_gla``): readable Numba CUDA reference
kernels.

GLA is the plain update rule with a per-key gate, so every stage is one the families share
(``ops/common/numba_chunk_stages.py``), run with ``gate_form="per_key"`` and ``update_rule="plain"``; this module
only allocates and launches them. In a chunk with start state ``S0`` ``[K, V]``, rows ``r = 0 .. n-1`` and ``G_r``
``[K]`` the chunk-local inclusive cumsum of the log-decay (natural log: the Numba stages work in base e)::

    S_end = e^G_last ⊙ S0 + Σ_r (e^(G_last − G_r) ⊙ k_r) v_rᵀ
    o_r   = scale ((e^G_r ⊙ q_r)ᵀ S0 + Σ_{j <= r} (q_r · (e^(G_r − G_j) ⊙ k_j)) v_j)

Forward stages: ``chunk_local_cumsum``, ``state_pass_fwd`` (h per chunk, the final state), ``chunk_output``.
Backward: the first two again, then ``chunk_output_dv_local``, ``state_pass_bwd`` (dh per chunk, dv, dh0),
``chunk_qk_grads`` (dq, dk and the exponent gradients of the decay factors), ``gate_grad`` (dg). Every decay across
a reset (a gate whose float32 decay is 0) is 0 and backward terms with a zero cotangent are skipped (the shared
stages' rules).

Works on numpy arrays (copied to the device, or to the Numba CUDA simulator with ``NUMBA_ENABLE_CUDASIM=1``) and on
CuPy device arrays (zero-copy, on CuPy's current stream or ``p.stream``).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.numba_chunk_stages import NumbaChunkStages
from ..common.numba_launch import NumbaLauncher, numba_device_scope

if TYPE_CHECKING:
    from .definition import GLAProblem


def _forward_stages(p: GLAProblem, st: NumbaChunkStages, ht: Any) -> types.SimpleNamespace:
    """Launch the gate cumsum and the state pass, writing the final state into the device array `ht`; returns the
    device arrays q, k, v ``[B, T, H, K|V]``, G and its reset counts R ``[B, T, H, K]``, h ``[NC, H, K, V]`` (each
    chunk's start state) and delta (v as written, ``[B, T, H, V]``), float32."""
    L = st.L
    s = types.SimpleNamespace()
    s.q, s.k, s.v, g = (L.put_f32(x) for x in (p.q, p.k, p.v, p.g))
    s.G, s.R = L.scratch(p.B, p.T, p.H, p.K), L.scratch(p.B, p.T, p.H, p.K)
    st.chunk_local_cumsum(g, s.G, s.R)
    s.h, s.delta = L.scratch(st.n_chunks, p.H, p.K, p.V), L.scratch(p.B, p.T, p.H, p.V)
    h0 = None if p.initial_state is None else L.put(p.initial_state)
    st.state_pass_fwd(s.k, s.G, s.R, s.v, h0, s.h, s.delta, ht)
    return s


def _stages(p: GLAProblem, chunk_size: int, L: NumbaLauncher) -> NumbaChunkStages:
    """The shared stages for a call: a per-key gate, the plain update rule, one state head per key head."""
    return NumbaChunkStages(L, p.seq_bounds, chunk_size, p.H, p.H, p.K, p.V, gate_form="per_key", update_rule="plain")


def chunk_forward(p: GLAProblem, chunk_size: int) -> tuple[Any, Any]:
    """Chunked GLA forward in float32.

    Args:
        p: the validated call (README.md for the math).
        chunk_size: rows per chunk, at most 64.

    Returns:
        ``(o, ht)``: o ``[B, T, H, V]`` and the final state ``[N, H, K, V]`` (always computed; an empty sequence's is
        its initial state, or zeros), both float32, in the array library of ``p.q``.
    """
    xp = p.xp
    with numba_device_scope(xp, p.stream, p.q):
        L = NumbaLauncher(xp)
        o = empty(xp, (p.B, p.T, p.H, p.V), np.float32)
        ht = empty(xp, (p.N, p.H, p.K, p.V), np.float32)
        st = _stages(p, chunk_size, L)
        s = _forward_stages(p, st, L.out(ht))
        st.chunk_output(s.q, s.k, s.G, s.R, s.h, s.delta, L.out(o), p.scale)
        L.finish()
    return o, ht


def chunk_backward(p: GLAProblem, chunk_size: int, do: Any, dht: Any) -> dict[str, Any]:
    """Gradients of the chunked GLA in float32, chunk by chunk (README.md, "Chunked form", backward).

    The gate gradient is summed over the decay factors spanning each step (the shared ``gate_grad`` stage), never as
    the reverse cumsum of ``q ⊙ dq − k ⊙ dk``, whose O(1) terms cancel in float32 under strong decay.

    Args:
        p: the validated call of the forward.
        chunk_size: the forward's chunk size.
        do: output cotangent ``[B, T, H, V]``.
        dht: final-state cotangent ``[N, H, K, V]``, or None.

    Returns:
        dict keyed ``q, k, v, g, gk, gv, initial_state``: float32 gradients shaped like their inputs, in the array
        library of ``p.q``; None for absent inputs (gk and gv always).
    """
    xp = p.xp
    f32 = np.float32
    B, T, H, K, V, C = p.B, p.T, p.H, p.K, p.V, chunk_size
    with numba_device_scope(xp, p.stream, p.q):
        L = NumbaLauncher(xp)
        st = _stages(p, C, L)
        s = _forward_stages(p, st, L.scratch(p.N, H, K, V))
        d_do = L.put(xp.asarray(do).astype(f32, copy=False))
        d_dht = None if dht is None else L.put(xp.asarray(dht).astype(f32, copy=False))
        dq, dk, dg = (empty(xp, (B, T, H, K), f32) for _ in range(3))
        dv = empty(xp, (B, T, H, V), f32)
        dh0 = empty(xp, (p.N, H, K, V), f32) if p.initial_state is not None else None
        d_dv, dh = L.out(dv), L.scratch(st.n_chunks, H, K, V)
        dexp, dexp_end = L.scratch(B, T, H, C + 1, K), L.scratch(B, T, H, K)

        st.chunk_output_dv_local(s.q, s.k, s.G, s.R, d_do, d_dv, p.scale)
        st.state_pass_bwd(s.q, s.k, s.G, s.R, d_do, d_dht, d_dv, dh, None if dh0 is None else L.out(dh0), p.scale)
        st.chunk_qk_grads(s.q, s.k, s.G, s.R, s.h, dh, s.delta, d_dv, d_do, L.out(dq), L.out(dk), dexp, dexp_end,
                          p.scale)
        st.gate_grad(dexp, dexp_end, L.out(dg))
        L.finish()
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gk": None, "gv": None, "initial_state": dh0}


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The numba backend's forward (the backend protocol, ``rawdelta/ops/common/opdef.py``): ``((o, ht), None)``;
    its backward recomputes what it needs."""
    return chunk_forward(p, p.chunk_size), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The numba backend's backward (the backend protocol): :func:`chunk_backward`."""
    return chunk_backward(p, p.chunk_size, do, dht)
