"""Random inputs of GLA's ops, shared by the tests, ``rawdelta check`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..common.inputs import float_dtype, logsigmoid, packed_sequences


def gla_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype: Any = "float32",
    seed: int = 42,
    seqlens: Sequence[int] | None = None,
    g: bool = True,
    gk: bool = True,
    gv: bool = False,
    initial_state: bool = True,
    gate_normalizer: float = 1.0,
) -> dict[str, Any]:
    """Random GLA inputs on the host, plus cotangents ``do`` and ``dht``.

    q, k ``[B, T, H, K]`` and v ``[B, T, H, V]`` are ``randn`` in `dtype` (bfloat16 through ml_dtypes). The per-key
    gate is ``logsigmoid(randn) / gate_normalizer`` ``[B, T, H, K]`` in float32, as in the peer's tests; it is
    returned as ``g`` (the chunked ops' name) and as ``gk`` (the recurrent op's), the same values, so every op of the
    family computes the same function on one draw. ``gv`` ``[B, T, H, V]`` is drawn the same way. With `seqlens`, B
    must be 1, T is their sum and ``cu_seqlens`` (int64) is returned. The random draws do not depend on which
    arrays are returned.

    Returns a dict of keyword arguments (q, k, v, g, gk, gv, initial_state ``[N, H, K, V]``, cu_seqlens; those asked
    for) plus ``do`` ``[B, T, H, V]`` and ``dht`` ``[N, H, K, V]`` (float32).
    """
    rng = np.random.default_rng(seed)
    dt = float_dtype(dtype)
    T, cu, N = packed_sequences(B, T, seqlens)
    out: dict[str, Any] = {name: rng.standard_normal((B, T, H, d)).astype(dt)
                           for name, d in (("q", K), ("k", K), ("v", V))}
    key_gate = (logsigmoid(rng.standard_normal((B, T, H, K))) / gate_normalizer).astype(np.float32)
    value_gate = (logsigmoid(rng.standard_normal((B, T, H, V))) / gate_normalizer).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((N, H, K, V))).astype(np.float32)
    if g:
        out["g"] = key_gate
    if gk:
        out["gk"] = key_gate.copy()
    if gv:
        out["gv"] = value_gate
    if initial_state:
        out["initial_state"] = h0
    if cu is not None:
        out["cu_seqlens"] = cu
    out["do"] = rng.standard_normal((B, T, H, V)).astype(np.float32)
    out["dht"] = rng.standard_normal((N, H, K, V)).astype(np.float32)
    return out
