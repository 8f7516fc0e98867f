"""Device helpers shared by every family's Numba CUDA reference kernels, recurrent and chunked.

Kernels run on a 1-D grid. Two thread mappings recur: one thread per state column (sequence ``n``, state
head ``hv``, column ``j`` of the ``[K, V]`` state; columns fastest), and one thread per chunk row (chunk
``c``, state head ``hv``, row ``r``; rows fastest). A thread keeps its state column in a local array of
:data:`MAX_K` floats.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from ...errors import UnsupportedConfigError
from .backend import numba_cuda

MAX_K = 256  # size of a thread's state column; a compile-time constant for cuda.local.array

# numba.cuda, bound by the factories below. Kernels and device functions must reach it as a module global: the
# CUDA simulator swaps the module in a function's globals for its fake one (closure variables would escape the
# swap). Every module that defines kernels follows this pattern.
cuda: Any = None


def check_key_dim(K: int) -> None:
    """Raise UnsupportedConfigError for a key dimension the Numba kernels cannot hold (``K > MAX_K``)."""
    if K > MAX_K:
        raise UnsupportedConfigError(f"backend='numba' supports K <= {MAX_K} (the state column lives in a local "
                                     f"array), got K={K}")


@functools.cache
def device_helpers() -> Any:
    """Compile (lazily, once) the shared device functions; returns a namespace.

    * ``column_thread(tid, HV, V, group) -> (n, hv, hk, j)``: the state column of a thread (columns fastest):
      sequence n (``n >= N`` past the last column), state head hv and its key head ``hk = hv // group``, column j.
    * ``load_column(S, x, n, hv, j, K, has_x)``: ``S[:K] = x[n, hv, :K, j]`` (x ``[N, HV, K, V]``), or zeros
      without x; ``store_column(x, S, n, hv, j, K)``: ``x[n, hv, :K, j] = S[:K]``.
    * ``chunk_row(tid, chunks, n_chunks, C, HV, group) -> (c, hv, hk, b, t0, n_rows, r, t)``: the chunk row of a
      thread (rows fastest): chunk c, state head hv and its key head ``hk = hv // group``, the chunk's batch row,
      first token and rows from the chunk table ``[NC, 3]``, the row r and its token t; the thread has no row
      when ``r >= n_rows`` (``n_rows`` is 0 past the last chunk).
    * ``dot(x, b, tx, hx, y, ty, hy, first, end)``: ``x[b, tx, hx, first:end] . y[b, ty, hy, first:end]`` of two
      ``[B, T, H, K]``-style arrays, float32.
    * ``dot0(...)``: ``dot`` with x a cotangent: a term whose x is 0 is 0, even against a NaN or an infinity in y
      (what a token past a NaN holds), so a zero cotangent carries nothing back.
    """
    global cuda
    cuda = numba_cuda()
    from numba import float32 as f32

    zero = f32(0.0)

    @cuda.jit(device=True)
    def column_thread(tid, HV, V, group):
        hv = (tid // V) % HV
        return tid // (V * HV), hv, hv // group, tid % V

    @cuda.jit(device=True)
    def seq_bounds(cu, n, T, varlen):
        """``(batch row, first token, end token)`` of sequence n (from ``cu_seqlens`` with varlen)."""
        if varlen:
            return 0, cu[n], cu[n + 1]
        return n, 0, T

    @cuda.jit(device=True)
    def load_column(S, x, n, hv, j, K, has_x):
        for i in range(K):
            S[i] = x[n, hv, i, j] if has_x else zero

    @cuda.jit(device=True)
    def store_column(x, S, n, hv, j, K):
        for i in range(K):
            x[n, hv, i, j] = S[i]

    @cuda.jit(device=True)
    def chunk_row(tid, chunks, n_chunks, C, HV, group):
        c, hv, r = tid // (C * HV), (tid // C) % HV, tid % C
        if c >= n_chunks:
            return c, hv, hv // group, 0, 0, 0, r, r
        return c, hv, hv // group, chunks[c, 0], chunks[c, 1], chunks[c, 2], r, chunks[c, 1] + r

    @cuda.jit(device=True)
    def dot(x, b, tx, hx, y, ty, hy, first, end):
        acc = zero
        for i in range(first, end):
            acc += x[b, tx, hx, i] * y[b, ty, hy, i]
        return acc

    @cuda.jit(device=True)
    def dot0(x, b, tx, hx, y, ty, hy, first, end):
        acc = zero
        for i in range(first, end):
            xi = x[b, tx, hx, i]
            if xi != zero:
                acc += xi * y[b, ty, hy, i]
        return acc

    return types.SimpleNamespace(column_thread=column_thread, seq_bounds=seq_bounds, load_column=load_column,
                                 store_column=store_column, chunk_row=chunk_row, dot=dot, dot0=dot0)
