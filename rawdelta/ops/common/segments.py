"""Segmented state passes for states with a diagonal transition across a chunk (per-key decays: GLA), the host side
of ``rawdelta/cuda/common/segment_combine.cu``.

A pass walks each sequence's chunks one after another, so few long sequences leave most SMs idle and each block's
walk long. Cut into S segments of whole chunks, the sequences become N S shorter ones: a pass from a zero state over
the segments gives each segment's own contribution, :func:`combine` the true state at every segment boundary, and
the pass again from those writes what the unsegmented pass writes. Only for batches of equal-length sequences
whose length is a multiple of S chunks (the segments are then a batch of equal-length sequences too, whose chunks
are the call's own).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.launch import ptr
from ...cuda.loader import register
from .chunk_table import launch_chunk_table

COMBINE_SOURCE = "common/segment_combine.cu"
MAX_SEGMENTS = 16  # segment_combine.cu: MAX_SEGMENTS
SEGMENT_COUNTS = (2, 4, 8, 16)
MIN_SEGMENT_CHUNKS = 32  # each segment walks at least this many chunks: shorter ones pay their extra pass for little
COMBINE_KERNEL = "segment_combine_kernel"
register(COMBINE_SOURCE, [COMBINE_KERNEL])


def segments_allowed(T: int, chunk_size: int, segments: int, cu_seqlens: Any) -> bool:
    """Whether sequences of T tokens cut into `segments` segments of whole chunks (no varlen)."""
    return (segments == 1 or (cu_seqlens is None and 1 < segments <= MAX_SEGMENTS
                              and T % (segments * chunk_size) == 0))


def segment_count(N: int, T: int, chunk_size: int, cu_seqlens: Any, blocks_per_sequence: int, sms: int) -> int:
    """Segments per sequence for a pass of `blocks_per_sequence` blocks per sequence on `sms` SMs: 1 (no
    segmenting) where the sequences' blocks fill the SMs or segments would be short, else the fewest that give at
    least two blocks per SM, or the most allowed."""
    if cu_seqlens is not None or N * blocks_per_sequence >= sms:
        return 1
    best = 1
    for s in SEGMENT_COUNTS:
        if not segments_allowed(T, chunk_size, s, None) or T // (s * chunk_size) < MIN_SEGMENT_CHUNKS:
            break
        best = s
        if N * s * blocks_per_sequence >= 2 * sms:
            break
    return best


def segment_table(N: int, T: int, chunk_size: int, segments: int, num_chunks: int) -> Any:
    """The segments' first chunks ``[N S + 1]`` int32 on the device (the chunk table of the segments as sequences:
    their chunks are the call's, in the same order)."""
    return launch_chunk_table(None, N * segments, T // segments, chunk_size, num_chunks)[0]


def combine(local: Any, Dk: Any, seg_chunk0: Any, h0: Any, ht: Any, segments: int) -> Any:
    """Launch the combine: per sequence, the state at every segment boundary ``[N S, H, K, V]`` float32 (returned),
    from each segment's own end state `local` ``[N S, H, K, V]`` float32 (from a zero start), the chunks' per-key
    decays `Dk` ``[NC, H, K]`` float32 and the initial state `h0` ``[N, H, K, V]`` float32 (None: zero). Writes the
    final state `ht` ``[N, H, K, V]`` float32 where given."""
    import cupy

    ns, H, K, V = local.shape
    bounds = empty(cupy, local.shape, np.float32)
    n = ns // segments
    if n * H * K > 0:
        launch.launch(COMBINE_SOURCE, COMBINE_KERNEL, n * H * K, 128, 0, (
            local, Dk, seg_chunk0, ptr(h0), bounds, ptr(ht), np.int32(segments), np.int32(H), np.int32(K),
            np.int32(V)))
    return bounds
