"""What each op must move and compute, so a time can be shown against the device's floor.

A model gives, for one call at ``(B, T, H, D)`` (``K = V = D``, ``HV = H``) in one mode, the bytes that must
cross DRAM at least once (inputs read, outputs written; nothing intermediate) and the FLOPs of its matrix
products (2 per multiply-add). The floor is ``max(bytes / copy bandwidth, FLOPs / FLOP ceiling)``, both
measured on the device (:mod:`.timing`); a result is reported as ``floor / time``, 1.0 being the roofline.

Modelling choices, stated once:

- q, k, v, o, ``do`` and the q/k/v gradients are in the input dtype; gates, beta and their gradients in
  float32; states in float32 (api.md).
- Backward FLOPs are three times the forward's: a recompute of the forward plus two products per forward
  product (the peer's recompute policy, which rawdelta follows).
- The recurrent op counts ``7 K V`` FLOPs per token and head (decay, ``S^T k``, rank-one update, ``S^T q``);
  the chunked op counts its chunked algorithm at chunk size ``C = 64``: ``6 K V + C (6 K + 4 V) + 2 C^2 / 3``
  per token and head (state products, the in-chunk ``K K^T``, ``w``, ``u``, ``q K^T`` and the triangular
  solve).
- GLA moves a per-key gate (``[B, T, H, K]`` float32) instead of GDN's scalar gate and beta (its benchmarks give no
  ``gv``). Its recurrent op counts ``5 K V`` FLOPs per token and head (decay, rank-one update, ``S^T q``); its
  chunked ops count ``4 K V + C (2 K + 2 V)`` at ``C = 64`` (the state update and the inter-chunk output, the
  in-chunk scores ``q K^T`` and their product with ``V``).
- Causal softmax attention (the yardstick) counts ``2 B H T^2 D`` FLOPs forward (half of ``Q K^T`` and
  ``P V``) and 2.5 times that for its backward (five products instead of two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .modes import DECODE, FORWARD_BACKWARD, Shape

F32 = 4
CHUNK = 64


@dataclass(frozen=True)
class Work:
    """Bytes that must move and FLOPs that must be done by one call."""

    bytes: int
    flops: int


def _gdn_bytes(shape: Shape, mode: str, e: int) -> int:
    B, T, H, D = shape
    tok = B * T * H
    fwd = 3 * tok * D * e + 2 * tok * F32 + tok * D * e  # q, k, v, g, beta in; o out
    if mode == DECODE:
        return fwd + 2 * B * H * D * D * F32  # the state read and the new state written
    if mode == FORWARD_BACKWARD:
        # backward: q, k, v, g, beta and do read again; dq, dk, dv, dg, dbeta written
        return fwd + (4 * tok * D * e + 2 * tok * F32) + (3 * tok * D * e + 2 * tok * F32)
    return fwd


def _backward_factor(mode: str) -> int:
    return 4 if mode == FORWARD_BACKWARD else 1


def gdn_recurrent(shape: Shape, mode: str, dtype_bytes: int) -> Work:
    """Token-by-token gated delta rule: ``7 K V`` FLOPs per token and head."""
    B, T, H, D = shape
    flops = 7 * B * T * H * D * D
    return Work(_gdn_bytes(shape, mode, dtype_bytes), flops * _backward_factor(mode))


def gdn_chunk(shape: Shape, mode: str, dtype_bytes: int) -> Work:
    """Chunked gated delta rule (``C = 64``): state products plus the in-chunk WY products per token and head."""
    B, T, H, D = shape
    per_token = 6 * D * D + CHUNK * (6 * D + 4 * D) + (2 * CHUNK * CHUNK) // 3
    return Work(_gdn_bytes(shape, mode, dtype_bytes), B * T * H * per_token * _backward_factor(mode))


def _gla_bytes(shape: Shape, mode: str, e: int) -> int:
    B, T, H, D = shape
    tok = B * T * H
    fwd = 3 * tok * D * e + tok * D * F32 + tok * D * e  # q, k, v, the per-key gate in; o out
    if mode == DECODE:
        return fwd + 2 * B * H * D * D * F32
    if mode == FORWARD_BACKWARD:
        # backward: q, k, v, gate and do read again; dq, dk, dv and the gate's gradient written
        return fwd + (4 * tok * D * e + tok * D * F32) + (3 * tok * D * e + tok * D * F32)
    return fwd


def gla_recurrent(shape: Shape, mode: str, dtype_bytes: int) -> Work:
    """Token-by-token GLA: ``5 K V`` FLOPs per token and head."""
    B, T, H, D = shape
    return Work(_gla_bytes(shape, mode, dtype_bytes), 5 * B * T * H * D * D * _backward_factor(mode))


def gla_chunk(shape: Shape, mode: str, dtype_bytes: int) -> Work:
    """Chunked GLA (``C = 64``): the state products plus the in-chunk scores and their product with the values."""
    B, T, H, D = shape
    per_token = 4 * D * D + CHUNK * (2 * D + 2 * D)
    return Work(_gla_bytes(shape, mode, dtype_bytes), B * T * H * per_token * _backward_factor(mode))


def softmax_attention(shape: Shape, mode: str, dtype_bytes: int) -> Work:
    """Causal softmax attention (flash: no ``T x T`` matrix in DRAM)."""
    B, T, H, D = shape
    tok = B * T * H
    nbytes = 4 * tok * D * dtype_bytes  # q, k, v in; o out
    flops = 2 * B * H * T * T * D
    if mode == FORWARD_BACKWARD:
        nbytes += 8 * tok * D * dtype_bytes  # q, k, v, o, do in; dq, dk, dv out
        flops = flops * 7 // 2
    return Work(nbytes, flops)


MODELS: dict[str, Callable[[Shape, str, int], Work]] = {
    "gdn_recurrent": gdn_recurrent,
    "gdn_chunk": gdn_chunk,
    "gla_recurrent": gla_recurrent,
    "gla_chunk": gla_chunk,
    "softmax_attention": softmax_attention,
}


def floor_seconds(work: Work, copy_bytes_per_s: float | None, flops_per_s: float | None) -> tuple[float | None, str]:
    """``(floor in seconds, "memory" or "compute")``: the larger of the two bounds; None without ceilings."""
    t_mem = work.bytes / copy_bytes_per_s if copy_bytes_per_s else 0.0
    t_flop = work.flops / flops_per_s if flops_per_s else 0.0
    if not (t_mem or t_flop):
        return None, ""
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")
