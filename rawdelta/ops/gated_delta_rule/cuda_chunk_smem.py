"""Dynamic shared-memory bytes of each kernel of the CUDA chunked gated delta rule.

Each mirrors the ``SmemCursor`` carve-up of its kernel (``rawdelta/cuda/gated_delta_rule/*.cu`` and the passes of
``rawdelta/cuda/common/``): every buffer is rounded up to 16 bytes; tiles of input precision are 2-byte (split into
two for float32 inputs), Split tiles are two 2-byte tiles, the rest float32.
"""

from __future__ import annotations

from ..common.cuda_smem import PAD, RAW, chunk_rows, f32, in_tile, r1024, split, wg_pass
from .cuda_chunk_kernels import BVB, KS, WG_BT, bv

__all__ = ["bwd_state", "dqk", "dqk_wg", "fwd", "prepare", "wg_pass"]


def prepare(ct: str, bt: int, kp: int) -> int:
    """The prepare kernel."""
    lda, ldx = bt + 8, bt // 2 + 4  # L, the inverse and its scratch share the q / k tiles' space
    return (max(2 * in_tile(ct, bt * (kp + PAD)), 2 * f32(bt * lda) + f32(bt // 2 * ldx)) + 4 * f32(bt)
            + f32(bt + 4))


def fwd(ct: str, bt: int, kp: int, store: bool) -> int:
    """The mma.sync forward state pass: q (not with ``store``), k, v, the scores (not with ``store``), the rule's
    inverse, the state, r, 2^(G_last - G) delta and the rows."""
    b = bv(ct, kp)
    ldk, ldv, lda, ldp = kp + PAD, b + PAD, bt + PAD, bt + PAD
    tiles = (1 if store else 2) * in_tile(ct, bt * ldk) + in_tile(ct, bt * ldv)
    tiles += 0 if store else in_tile(ct, bt * ldp)
    return tiles + split(bt * lda) + split(kp * ldv) + 2 * split(bt * ldv) + chunk_rows(bt)


def _acc_wn(m: int, n: int, nw: int) -> int:
    wm = min(m // 16, nw)
    return min(nw // wm, n // 8)


def bwd_state(ct: str, bt: int, kp: int) -> int:
    """The mma.sync reverse state pass: q, k, the scores, do, the rule's inverse, the state gradient, dU, the
    scaled do, the rows and the rule's row-sum scratch."""
    b = bv(ct, kp)
    ldk, ldv, lda, ldp = kp + PAD, b + PAD, bt + PAD, bt + PAD
    tiles = 2 * in_tile(ct, bt * ldk) + in_tile(ct, bt * ldp) + in_tile(ct, bt * ldv)
    return (tiles + split(bt * lda) + split(kp * ldv) + 2 * split(bt * ldv) + chunk_rows(bt)
            + f32(_acc_wn(bt, b, 8) * bt) + f32(bt))


def dqk(ct: str, bt: int) -> int:
    """The mma.sync dq/dk kernel."""
    ldk, ldv, ldm = KS + PAD, BVB + PAD, bt + PAD
    tiles = 2 * in_tile(ct, bt * ldk) + 3 * in_tile(ct, bt * ldv) + 2 * in_tile(ct, KS * ldv)
    return tiles + 2 * split(bt * ldm) + chunk_rows(bt) + f32(8 * bt) + f32(4 * bt) + f32(8)


def dqk_wg(ksw: int) -> int:
    """The Hopper dq/dk kernel: two slots of an item's q, k and raw rows, two of a V step's do, y, delta, h and dh
    tiles, the float C tile and the row arrays."""
    ks, bt = 2 * ksw, WG_BT
    qk = r1024(2 * bt * ks * 2 + RAW * bt * 4)
    vstep = 3 * bt * BVB * 2 + 2 * ks * BVB * 2
    return 2 * qk + 2 * vstep + f32(bt * (bt + 4)) + chunk_rows(bt) + f32(12 * bt) + f32(6 * bt) + f32(8)
