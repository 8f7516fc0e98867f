"""The ``numba`` backend of the recurrent GLA: readable Numba CUDA reference kernels.

One thread owns one column ``j`` of the state of one sequence ``n`` and head ``h`` and walks the tokens in the
recurrence's order (last to first with ``reverse``), keeping ``S[:, j]`` (``K <= 256``) in a local array. Columns
are independent in the recurrence (README.md), so no thread talks to another. Arithmetic is float32 throughout,
without tensor cores; the kernels favour clarity over speed.

Passes:

* forward: :func:`recurrent_forward` launches the forward kernel once.
* backward: the forward kernel runs again and stores the state before every token (``[B, T, H, K, V]``, so memory
  grows with T), then the backward kernel walks each column in the opposite order. Per-column contributions to
  row quantities (dq, dk, dgk) go to buffers with a trailing column axis and are summed afterwards
  (deterministic, no atomics).

A decay of 0 (a reset) discards the state without multiplying it, and backward terms whose cotangent is 0 are
skipped, so a NaN or an infinity at a token never reaches the tokens visited before it. Works on numpy arrays
(copied to the device, or to the Numba CUDA simulator with ``NUMBA_ENABLE_CUDASIM=1``) and on CuPy device arrays
(zero-copy, on CuPy's current stream or ``p.stream``). Results come back in the array library of ``p.q``.
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
from ..common.numba_launch import NumbaLauncher, numba_device_scope

if TYPE_CHECKING:
    from .definition import GLAProblem

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
    helpers = device_helpers()
    column_thread, seq_bounds = helpers.column_thread, helpers.seq_bounds
    load_column, store_column = helpers.load_column, helpers.store_column

    @cuda.jit(device=True)
    def sequence(cu, n, T, varlen, reverse):
        """``(batch row, first token visited, token past the last visited, step)`` of sequence n."""
        b, bos, eos = seq_bounds(cu, n, T, varlen)
        if reverse:
            return b, eos - 1, bos - 1, -1
        return b, bos, eos, 1

    @cuda.jit(device=True)
    def key_decay(gk, b, t, h, i, has_gk):
        return math.exp(gk[b, t, h, i]) if has_gk else one

    @cuda.jit(device=True)
    def column_decay(gv, b, t, h, j, has_gv):
        return math.exp(gv[b, t, h, j]) if has_gv else one

    def forward(q, k, v, gk, gv, h0, cu, o, ht, states, n_seq, T, H, K, V, scale, has_gk, has_gv, has_h0, varlen,
                reverse, store):
        n, h, _, j = column_thread(cuda.grid(1), H, V, 1)
        if n >= n_seq:
            return
        b, first, stop, step = sequence(cu, n, T, varlen, reverse)
        S = cuda.local.array(MAX_K, f32)
        load_column(S, h0, n, h, j, K, has_h0)
        for t in range(first, stop, step):
            if store:
                for i in range(K):
                    states[b, t, h, i, j] = S[i]
            dcol = column_decay(gv, b, t, h, j, has_gv)
            vj = v[b, t, h, j]
            acc = zero
            for i in range(K):
                d = dcol * key_decay(gk, b, t, h, i, has_gk)
                S[i] = (S[i] * d if d != zero else zero) + k[b, t, h, i] * vj
                acc += S[i] * q[b, t, h, i]
            o[b, t, h, j] = scale * acc
        store_column(ht, S, n, h, j, K)

    def backward(q, k, v, gk, gv, cu, states, do, dht, dq_part, dk_part, dgk_part, dv, dgv, dh0,
                 n_seq, T, H, K, V, scale, has_gk, has_gv, has_h0, varlen, reverse, has_dht):
        n, h, _, j = column_thread(cuda.grid(1), H, V, 1)
        if n >= n_seq:
            return
        b, first, stop, step = sequence(cu, n, T, varlen, reverse)
        dS = cuda.local.array(MAX_K, f32)  # gradient w.r.t. column j of the state after the token
        load_column(dS, dht, n, h, j, K, has_dht)
        # the forward's order reversed: from the last token it visited back to the first
        for t in range(stop - step, first - step, -step):
            dcol = column_decay(gv, b, t, h, j, has_gv)
            vj = v[b, t, h, j]
            dout = do[b, t, h, j]
            dvj = zero
            z = zero
            for i in range(K):
                d = dcol * key_decay(gk, b, t, h, i, has_gk)
                St = states[b, t, h, i, j] * d if d != zero else zero  # the decayed state before the update
                if dout != zero:
                    dS[i] += scale * q[b, t, h, i] * dout
                    dq_part[b, t, h, i, j] = scale * (St + k[b, t, h, i] * vj) * dout
                else:
                    dq_part[b, t, h, i, j] = zero
                dk_part[b, t, h, i, j] = dS[i] * vj
                dvj += dS[i] * k[b, t, h, i]
                zi = dS[i] * St if dS[i] != zero else zero
                if has_gk:
                    dgk_part[b, t, h, i, j] = zi
                z += zi
                dS[i] = d * dS[i] if dS[i] != zero else zero
            dv[b, t, h, j] = dvj
            if has_gv:
                dgv[b, t, h, j] = z
        if has_h0:
            store_column(dh0, dS, n, h, j, K)

    # forward_py / backward_py stay uncompiled so a PTX compile check can type them without a GPU.
    return types.SimpleNamespace(forward=cuda.jit(forward), backward=cuda.jit(backward),
                                 forward_py=forward, backward_py=backward)


def _run_forward(p: GLAProblem, L: NumbaLauncher, store_states: bool) -> tuple[Any, Any, Any, list[Any], list[Any]]:
    """Launch the forward kernel; returns ``(o, ht, states device array or None, input arrays, scalars)``."""
    xp = p.xp
    q, k, v = (L.put_f32(x) for x in (p.q, p.k, p.v))
    gk, gv = L.put_f32_or_dummy(p.gk, 4), L.put_f32_or_dummy(p.gv, 4)
    cu = L.put(xp.asarray(p.cu_seqlens, dtype=np.int64) if p.cu_seqlens is not None else xp.zeros(1, np.int64))
    h0 = L.put_f32_or_dummy(p.initial_state, 4)
    o = empty(xp, (p.B, p.T, p.H, p.V), np.float32)
    ht = empty(xp, (p.N, p.H, p.K, p.V), np.float32)
    if store_states:
        # The backward only needs the states on the device: never copied back.
        d_o, d_ht = L.put(o), L.put(ht)
        d_states = L.put(empty(xp, (p.B, p.T, p.H, p.K, p.V), np.float32))
    else:
        d_o, d_ht = L.out(o), L.out(ht)
        d_states = L.dummy(5)
    scalars = [p.N, p.T, p.H, p.K, p.V, np.float32(p.scale), p.gk is not None, p.gv is not None,
               p.initial_state is not None, p.cu_seqlens is not None, p.reverse]
    L.launch(_kernels().forward, p.N * p.H * p.V, q, k, v, gk, gv, h0, cu, d_o, d_ht, d_states, *scalars,
             store_states)
    return o, ht, (d_states if store_states else None), [q, k, v, gk, gv, cu], scalars


def recurrent_forward(p: GLAProblem) -> tuple[Any, Any]:
    """GLA forward, token by token, in float32.

    Args:
        p: the validated call (README.md for the math and every option).

    Returns:
        ``(o, ht)``: o ``[B, T, H, V]`` and the final state ``[N, H, K, V]``, both float32, in the array library of
        ``p.q``.
    """
    with numba_device_scope(p.xp, p.stream, p.q):
        L = NumbaLauncher(p.xp)
        o, ht, _, _, _ = _run_forward(p, L, store_states=False)
        L.finish()
    return o, ht


def recurrent_backward(p: GLAProblem, do: Any, dht: Any) -> dict[str, Any]:
    """Gradients of the recurrent GLA (README.md backward), in float32.

    Args:
        p: the validated call of the forward.
        do: output cotangent ``[B, T, H, V]``.
        dht: final-state cotangent ``[N, H, K, V]``, or None.

    Returns:
        dict keyed ``q, k, v, g, gk, gv, initial_state``: float32 gradients shaped like their inputs, in the array
        library of ``p.q``; None for absent inputs (``g`` always).
    """
    xp = p.xp
    f32 = np.float32
    B, T, H, K, V, N = p.B, p.T, p.H, p.K, p.V, p.N
    with numba_device_scope(xp, p.stream, p.q):
        L = NumbaLauncher(xp)
        _, _, d_states, (q, k, v, gk, gv, cu), scalars = _run_forward(p, L, store_states=True)
        d_do = L.put_f32(xp.asarray(do))
        d_dht = L.put_f32_or_dummy(None if dht is None else xp.asarray(dht), 4)
        dq_part, dk_part = empty(xp, (B, T, H, K, V), f32), empty(xp, (B, T, H, K, V), f32)
        dgk_part = empty(xp, (B, T, H, K, V), f32) if p.gk is not None else None
        dv = empty(xp, (B, T, H, V), f32)
        dgv = empty(xp, (B, T, H, V), f32) if p.gv is not None else None
        dh0 = empty(xp, (N, H, K, V), f32) if p.initial_state is not None else None
        L.launch(_kernels().backward, N * H * V, q, k, v, gk, gv, cu, d_states, d_do, d_dht, L.out(dq_part),
                 L.out(dk_part), L.out_or_dummy(dgk_part, 5), L.out(dv), L.out_or_dummy(dgv, 4),
                 L.out_or_dummy(dh0, 4), *scalars, dht is not None)
        L.finish()
    return {"q": dq_part.sum(axis=-1), "k": dk_part.sum(axis=-1), "v": dv, "g": None,
            "gk": None if dgk_part is None else dgk_part.sum(axis=-1), "gv": dgv, "initial_state": dh0}


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The numba backend's forward (the backend protocol, ``rawdelta/ops/common/opdef.py``): ``((o, ht), None)``;
    its backward recomputes what it needs."""
    return recurrent_forward(p), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The numba backend's backward (the backend protocol): :func:`recurrent_backward`."""
    return recurrent_backward(p, do, dht)
