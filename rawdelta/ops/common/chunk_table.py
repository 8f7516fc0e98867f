"""The chunk table every chunked op's CUDA kernels take (``rawdelta/cuda/common/chunk_table.cu``), built on the
device so that a varlen call needs no host copy of ``cu_seqlens``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...cuda import launch
from ...cuda.launch import ptr
from ...cuda.loader import register
from .state_pass_host import PASS_VARLEN
from .workspace import Field, field_arrays

TABLE_SOURCE = "common/chunk_table.cu"
TABLE_KERNEL = "chunk_table_kernel"
register(TABLE_SOURCE, [TABLE_KERNEL])


def chunk_table_fields(N: int, num_chunks: int) -> list[Field]:
    """The chunk table's arrays as workspace fields (``rawdelta/ops/common/workspace.py``), for a caller that carves
    them out of one allocation with its own: ``seq_chunk0``, ``chunk_bos``, ``chunk_len``."""
    nc = max(num_chunks, 1)
    return [("seq_chunk0", (N + 1,), np.dtype(np.int32)), ("chunk_bos", (nc,), np.dtype(np.int64)),
            ("chunk_len", (nc,), np.dtype(np.int32))]


def launch_chunk_table(cu_seqlens: Any, N: int, T: int, chunk_size: int, num_chunks: int,
                       out: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """Launch the chunk table of N sequences (of T tokens each, or from ``cu_seqlens`` ``[N + 1]`` int64) cut into
    chunks of `chunk_size` that never cross a sequence start; `num_chunks` of them. Returns the device arrays
    ``(seq_chunk0 [N + 1] int32, chunk_bos [max(NC, 1)] int64, chunk_len [max(NC, 1)] int32)``: each sequence's
    first chunk (and the count last), each chunk's first token and length; in `out`'s arrays of those names
    (:func:`chunk_table_fields`) where given, else carved out of one fresh allocation."""
    if out is None:
        out = field_arrays(chunk_table_fields(N, num_chunks), None)
    seq_chunk0, chunk_bos, chunk_len = out["seq_chunk0"], out["chunk_bos"], out["chunk_len"]
    launch.launch(TABLE_SOURCE, TABLE_KERNEL, 1, 1024, 0, (
        ptr(cu_seqlens), np.int32(N), np.int32(T), np.int32(chunk_size), seq_chunk0, chunk_bos, chunk_len,
        np.int32(PASS_VARLEN if cu_seqlens is not None else 0)))
    return seq_chunk0, chunk_bos, chunk_len


def max_chunks(B: int, T: int, chunk_size: int, n_seqs: int | None = None) -> int:
    """The chunks of `chunk_size` over B sequences of T tokens; with ``n_seqs`` (varlen: B = 1, T tokens in all)
    the most that any `n_seqs` sequences of T tokens in all can have. For buffers sized from shapes alone."""
    if n_seqs is None:
        return B * -(-T // chunk_size)
    # each sequence of L tokens has at most (L + chunk_size - 1) / chunk_size chunks, and each chunk a token
    return min(B * T, (B * T + n_seqs * (chunk_size - 1)) // chunk_size)
