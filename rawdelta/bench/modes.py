"""The benchmark modes and the shape tuple, shared by the registry and the implementation builders."""

from __future__ import annotations

Shape = tuple[int, int, int, int]  # (B, T, H, D): K = V = D, HV = H

FORWARD, FORWARD_BACKWARD, DECODE = "forward", "forward+backward", "decode"
MODES: tuple[str, ...] = (FORWARD, FORWARD_BACKWARD, DECODE)
