"""Random inputs of the gated delta rule's ops, shared by the tests, ``rawdelta check`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..common.inputs import float_dtype, logsigmoid, packed_sequences


def gated_delta_rule_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    HV: int | None = None,
    dtype: Any = "float32",
    seed: int = 42,
    seqlens: Sequence[int] | None = None,
    g: bool = True,
    gk: bool = False,
    gv: bool = False,
    beta: bool = True,
    beta_per_v: bool = False,
    initial_state: bool = True,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    gate_normalizer: float = 1.0,
) -> dict[str, Any]:
    """Random gated-delta-rule inputs on the host, plus cotangents ``do`` and ``dht``.

    q, k, v ``[B, T, H(V), K|V]`` in `dtype` (bfloat16 through ml_dtypes); k is L2-normalised unless
    ``use_qk_l2norm_in_kernel`` (the kernel normalises then). Gates are ``logsigmoid(randn) /
    gate_normalizer`` in float32 (raw ``randn`` with ``use_gate_in_kernel``, plus ``A_log = log U(1, 16)``
    and ``dt_bias``); beta is ``sigmoid(randn)`` (logits with ``use_beta_sigmoid_in_kernel``). With
    `seqlens`, B must be 1, T is their sum and ``cu_seqlens`` (int64) is returned.

    Returns a dict of keyword arguments for the op (q, k, v, g, beta, initial_state, cu_seqlens, gk, gv,
    A_log, dt_bias, use_* flags) plus ``do`` ``[B, T, HV, V]`` and ``dht`` ``[N, HV, K, V]`` (float32).
    """
    HV = H if HV is None else HV
    rng = np.random.default_rng(seed)
    dt = float_dtype(dtype)
    T, cu, N = packed_sequences(B, T, seqlens)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if not use_qk_l2norm_in_kernel:
        k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + 1e-6)
    v = rng.standard_normal((B, T, HV, V))
    out: dict[str, Any] = {"q": q.astype(dt), "k": k.astype(dt), "v": v.astype(dt)}
    if g:
        if use_gate_in_kernel:
            out["g"] = rng.standard_normal((B, T, HV)).astype(np.float32)
            out["A_log"] = np.log(rng.uniform(1, 16, HV)).astype(np.float32)
            out["dt_bias"] = (0.5 * rng.standard_normal(HV)).astype(np.float32)
        else:
            out["g"] = (logsigmoid(rng.standard_normal((B, T, HV))) / gate_normalizer).astype(np.float32)
    if gk:
        out["gk"] = (logsigmoid(rng.standard_normal((B, T, HV, K))) / gate_normalizer).astype(np.float32)
    if gv:
        out["gv"] = (logsigmoid(rng.standard_normal((B, T, HV, V))) / gate_normalizer).astype(np.float32)
    if beta:
        shape = (B, T, HV, V) if beta_per_v else (B, T, HV)
        logits = rng.standard_normal(shape)
        out["beta"] = (logits if use_beta_sigmoid_in_kernel else 1 / (1 + np.exp(-logits))).astype(np.float32)
    if initial_state:
        out["initial_state"] = (0.5 * rng.standard_normal((N, HV, K, V))).astype(np.float32)
    if cu is not None:
        out["cu_seqlens"] = cu
    out["use_qk_l2norm_in_kernel"] = use_qk_l2norm_in_kernel
    if use_gate_in_kernel:
        out["use_gate_in_kernel"] = True
    if use_beta_sigmoid_in_kernel:
        out["use_beta_sigmoid_in_kernel"] = True
    out["do"] = rng.standard_normal((B, T, HV, V)).astype(np.float32)
    out["dht"] = rng.standard_normal((N, HV, K, V)).astype(np.float32)
    return out
