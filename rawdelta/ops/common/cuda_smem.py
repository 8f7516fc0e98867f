"""Byte counts of the shared-memory buffers the CUDA chunk kernels carve (``SmemCursor`` in
``rawdelta/cuda/common/chunk_stages.cuh``), for the families' dynamic shared-memory sizes: every buffer is rounded up
to 16 bytes; tiles of input precision are 2-byte (split into two for float32 inputs), Split tiles are two 2-byte
tiles, the rest float32.
"""

from __future__ import annotations

PAD = 8  # TILE_PAD: elements added to every 16-bit mma.sync tile row
SMEM_LIMIT = 227 * 1024  # the opt-in dynamic shared memory of one block on sm_90 (H100)
SM_SMEM = 228 * 1024  # shared memory per SM (H100; A100 has 164 KB)
ROWS = 7  # ChunkRows: per-chunk row arrays of BT floats, besides its BT + 4 ints (reset counts, live rows)


def r16(nbytes: int) -> int:
    """`nbytes` rounded up to 16 bytes (one carved buffer)."""
    return (nbytes + 15) // 16 * 16


def in_tile(ct: str, n: int) -> int:
    """A tile of `n` elements of input precision (C type `ct`): 16-bit, split in two for float32 inputs."""
    return r16(2 * n) * (2 if ct == "float" else 1)


def raw_tile(ct: str, n: int) -> int:
    """A tile of `n` elements in the input type itself (C type `ct`: float32 stays float32, unsplit)."""
    return r16((4 if ct == "float" else 2) * n)


def split(n: int) -> int:
    """A Split tile (hi and lo 16-bit parts) of `n` elements."""
    return 2 * r16(2 * n)


def f32(n: int) -> int:
    """`n` float32 (or int32) values."""
    return r16(4 * n)


def chunk_rows(bt: int) -> int:
    """ChunkRows of a chunk of `bt` rows (without a per-key gate's decays)."""
    return ROWS * f32(bt) + f32(bt + 4)


RAW = 5  # ChunkRows::RAW: per-token 4-byte row values a prefetching kernel stages per row
WG_BT = 64  # the Hopper state passes' chunk size


def r1024(nbytes: int) -> int:
    """Rounded up to whole 1024-byte units: a stage of TMA tiles keeps the next one aligned to the 128-byte swizzle's
    period."""
    return (nbytes + 1023) // 1024 * 1024


def wg_stage(kp: int, cols: int, q_p: bool, do: bool, has_a: bool = True, p_lo: bool = False) -> int:
    """Bytes of one WgStage (``rawdelta/cuda/common/wg_state_pass.cuh``) of `cols` value columns: the k and v tiles,
    the rule's matrix with ``has_a``, q and the scores with ``q_p``, the scores' lo part with ``p_lo``, do with
    ``do``, and the raw row scalars."""
    bt = WG_BT
    mats = (1 if has_a else 0) + (1 if q_p else 0) + (1 if p_lo else 0)
    return r1024(2 * ((2 if q_p else 1) * bt * kp + (2 if do else 1) * bt * cols + mats * bt * bt) + RAW * bt * 4)


def wg_pass(kp: int, cols: int, pipe: bool, q_p: bool, do: bool, has_a: bool = True, key_gate: bool = False,
            p_lo: bool = False) -> int:
    """A Hopper state pass of `cols` value columns per block: its stages (with the scores' lo part: ``p_lo``), the
    state tile, value-sized tiles (two forward; one in the reverse pass, ``do``, which scales do in its stage), the
    rows, four mbarriers, a per-key gate's decays (``key_gate``: one slot per stage) and the slack that aligns the
    stages to 1024 bytes (the TMA tiles' 128-byte swizzle)."""
    tiles, stages = (1 if do else 2), (2 if pipe else 1)
    return (stages * (wg_stage(kp, cols, q_p, do, has_a, p_lo) + (f32(kp) if key_gate else 0))
            + 2 * (kp * cols + tiles * WG_BT * cols) + chunk_rows(WG_BT) + 32 + 1024)
