"""Byte counts of the shared-memory buffers the CUDA chunk kernels carve (``SmemCursor`` in
``rawdelta/cuda/common/chunk_stages.cuh``), for the families' dynamic shared-memory sizes: every buffer is rounded up
to 16 bytes; tiles of input precision are 2-byte (split into two for float32 inputs), Split tiles are two 2-byte
tiles, the rest float32.
"""

from __future__ import annotations

PAD = 8  # TILE_PAD: elements added to every 16-bit mma.sync tile row
ROWS = 7  # ChunkRows: per-chunk row arrays of BT floats, besides its BT + 4 ints (reset counts, live rows)


def r16(nbytes: int) -> int:
    """`nbytes` rounded up to 16 bytes (one carved buffer)."""
    return (nbytes + 15) // 16 * 16


def in_tile(ct: str, n: int) -> int:
    """A tile of `n` elements of input precision (C type `ct`): 16-bit, split in two for float32 inputs."""
    return r16(2 * n) * (2 if ct == "float" else 1)


def split(n: int) -> int:
    """A Split tile (hi and lo 16-bit parts) of `n` elements."""
    return 2 * r16(2 * n)


def f32(n: int) -> int:
    """`n` float32 (or int32) values."""
    return r16(4 * n)


def chunk_rows(bt: int) -> int:
    """ChunkRows of a chunk of `bt` rows (without a per-key gate's decays)."""
    return ROWS * f32(bt) + f32(bt + 4)
