"""Framework-free cases and float64 references shared by the torch and JAX adapter tests.

Every test runs both ops: ``"recurrent"`` (``fused_recurrent_gated_delta_rule``) and ``"chunk"``
(``chunk_gated_delta_rule`` with ``chunk_size=CHUNK_SIZE``). The chunk op has no gk, gv or per-value beta, so
its cases drop those options (``gk_gv_beta_per_v`` becomes ``no_gate``). Both are compared with the float64
recurrent reference: the chunked form computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import rawdelta
from rawdelta.testing import gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from ..ops.gdn_cases import record_launches

DIFF_NAMES = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")
OPS = ("recurrent", "chunk")
CHUNK_SIZE = 16  # the smallest the op takes, so that the crossing cases cross chunks
RECURRENT_ONLY = ("gk", "gv", "beta_per_v")
FLAG_NAMES = ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval")
# assert_close names: the tolerance class comes from the name ("dg", "dbeta" are gates; "dh0" a gradient).
GRAD_LABEL = {n: ("dh0" if n == "initial_state" else "d" + n) for n in DIFF_NAMES}


@dataclass
class Case:
    """Host inputs of one call: float arrays, cu_seqlens, flags, and the cotangents do / dht."""

    arrays: dict[str, np.ndarray]
    cu_seqlens: np.ndarray | None
    flags: dict[str, Any]
    do: np.ndarray
    dht: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


# Tiny shapes (gradcheck cost grows with the number of input elements) covering every option family.
CASES: dict[str, dict[str, Any]] = {
    "g_beta": {"B": 2, "T": 4, "H": 2, "K": 3, "V": 2},
    "gk_gv_beta_per_v": {"B": 1, "T": 4, "H": 1, "K": 3, "V": 2, "g": False, "gk": True, "gv": True,
                         "beta_per_v": True},
    "l2norm_sigmoid_gate_in_kernel": {"B": 1, "T": 4, "H": 1, "K": 3, "V": 2, "use_qk_l2norm_in_kernel": True,
                                      "use_beta_sigmoid_in_kernel": True, "use_gate_in_kernel": True,
                                      "allow_neg_eigval": True},
    "varlen_empty_sequence": {"B": 1, "T": 0, "H": 1, "K": 3, "V": 2, "seqlens": [3, 0, 2]},
    "grouped_heads": {"B": 1, "T": 3, "H": 1, "HV": 2, "K": 3, "V": 2},
    # T crosses a chunk of CHUNK_SIZE (one full chunk, then a partial one); K = V = 2 keeps gradcheck cheap.
    "crosses_chunk": {"B": 1, "T": 20, "H": 1, "K": 2, "V": 2},
    "varlen_crosses_chunk": {"B": 1, "T": 0, "H": 1, "K": 2, "V": 2, "seqlens": [17, 0, 3]},
}
# The chunk op's cases: the recurrent-only options dropped.
CHUNK_RENAMED = {"gk_gv_beta_per_v": "no_gate"}
CHUNK_CASES: dict[str, dict[str, Any]] = {
    CHUNK_RENAMED.get(n, n): {k: v for k, v in spec.items() if k not in RECURRENT_ONLY} for n, spec in CASES.items()
}
# The richest small case of each op (every input kind it has; crossing chunks for the chunk op).
RICH_CASE = {"recurrent": "gk_gv_beta_per_v", "chunk": "crosses_chunk"}


def cases(op: str) -> dict[str, dict[str, Any]]:
    return CASES if op == "recurrent" else CHUNK_CASES


def op_cases(names: list[str] | None = None) -> list[tuple[str, str]]:
    """``(op, case name)`` pairs for parametrisation: every case of both ops, or the given recurrent names
    (mapped to their chunk names)."""
    if names is None:
        return [(op, n) for op in OPS for n in cases(op)]
    return [(op, n if op == "recurrent" else CHUNK_RENAMED.get(n, n)) for op in OPS for n in names]


def make_case(name: str, dtype: str = "float64", seed: int = 0, op: str = "recurrent", **overrides: Any) -> Case:
    spec = {**cases(op)[name], **overrides}
    allow_neg = spec.pop("allow_neg_eigval", False)
    kw, do, dht = split_op_args(gated_delta_rule_inputs(**spec, dtype="float64", seed=seed))
    arrays = {n: np.asarray(kw.pop(n), dtype=dtype) for n in DIFF_NAMES if n in kw}
    cu = kw.pop("cu_seqlens", None)
    flags = {n: bool(kw.pop(n, False)) for n in FLAG_NAMES}
    flags["allow_neg_eigval"] = bool(allow_neg)
    return Case(arrays, cu, flags, do.astype(np.float64), dht.astype(np.float64))


def reference(arrays: dict[str, np.ndarray], cu: np.ndarray | None, flags: dict[str, Any], do: np.ndarray,
              dht: np.ndarray | None, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Float64 ``(o, final_state, {name: gradient})`` from the NumPy references (inputs upcast to float64)."""
    a = {n: np.asarray(x, dtype=np.float64) for n, x in arrays.items()}
    kw = dict(a, scale=scale, cu_seqlens=cu, **flags)
    o, ht = rawdelta.naive_recurrent_gated_delta_rule(**kw, output_final_state=True)
    grads = rawdelta.naive_recurrent_gated_delta_rule_bwd(**kw, do=do, dht=dht)
    return o, ht, {n: getattr(grads, n) for n in arrays}


def count_prepare_launches(monkeypatch: Any) -> list[str]:
    """Record every launch of the chunked op's prepare kernel (which computes the per-chunk factors) from now on."""
    return record_launches(monkeypatch, "gdn_chunk_prepare_kernel")
