"""The correctness gate: every implementation's outputs at the benchmark shape against a float64 reference.

The float64 NumPy references are too slow for a whole benchmark problem (a Python loop over chunks or
tokens), but every op here is independent per sequence and head. So the reference runs on a slice: the
first and last batch row times the first and last head (:meth:`.GateSlice.corners`), every token; the
implementation runs the whole problem and the same slice of its outputs is compared, with
:func:`rawdelta.testing.assert_close` and the tolerance table of the input dtype. For the gated delta
op that is its own numpy backend (the chunked algorithm for a chunked op), forward and backward; for softmax
attention, a float64 causal attention on 64 query rows (o and dq of a row depend on that row only).

A reference job is a pure function of ``(op, shape, mode, dtype, seed)``: it regenerates the inputs, so
the runner can compute references in worker processes while the device is being timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..testing.compare import assert_close, error_stats
from .modes import DECODE, FORWARD_BACKWARD, Shape
from .workload import GateSlice, host_inputs, np_dtype

Expected = dict[str, np.ndarray]


def op_outputs(op_name: str, x: dict[str, Any], mode: str) -> Expected:
    """Float64 outputs of the op's own numpy backend (its chunked algorithm for a chunked op) on host inputs `x`
    (the generator's dict, already sliced): o, the final state in decode, and the gradients of the floating inputs
    in forward + backward (``dq``, ``dk`` ...)."""
    from ..ops import registry
    from ..testing.reference import grad_label, reference_results

    op = registry.op(op_name)
    kw = {n: a for n, a in x.items() if n not in ("do", "dht")}
    outs, grads = reference_results(op, kw, x["do"] if mode == FORWARD_BACKWARD else None, mode_op=True)
    out = {"o": outs["o"]}
    if mode == DECODE:
        out["final_state"] = outs["final_state"]
    out.update({grad_label(n): g for n, g in grads.items() if g is not None})
    return out


def softmax_attention(x: dict[str, Any], mode: str, rows: tuple[int, ...]) -> Expected:
    """Float64 causal softmax attention ``[B, T, H, D]`` at query `rows`: o, and dq in forward + backward."""
    q, k, v, do = (np.asarray(x[n], dtype=np.float64) for n in ("q", "k", "v", "do"))
    r = np.asarray(rows)
    scale = q.shape[-1] ** -0.5
    # [B, H, R, T] scores of the chosen rows against every key, causal mask
    s = np.einsum("brhd,bthd->bhrt", q[:, r], k) * scale
    s = np.where(np.arange(k.shape[1])[None, None, None, :] <= r[None, None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhrt,bthd->brhd", p, v)
    out = {"o": o}
    if mode == FORWARD_BACKWARD:
        dp = np.einsum("brhd,bthd->bhrt", do[:, r], v)
        ds = p * (dp - np.einsum("brhd,brhd->bhr", do[:, r], o)[..., None])
        out["dq"] = np.einsum("bhrt,bthd->brhd", ds, k) * scale
    return out


def attention_rows(T: int, n: int = 64) -> tuple[int, ...]:
    """Up to `n` query rows spread over ``[0, T)``, the last one included."""
    return tuple(int(t) for t in np.unique(np.linspace(0, T - 1, min(T, n)).round().astype(int)))


@dataclass(frozen=True)
class Reference:
    """How to gate against a reference: which slice of the outputs, and the function computing it.

    ``offload``: slow enough (seconds at the big shapes) to be worth a worker process.
    """

    gate_slice: Callable[[Shape], GateSlice]
    compute: Callable[[dict[str, Any], str, GateSlice], Expected]
    offload: bool = False


_SOFTMAX = Reference(lambda shape: GateSlice.corners(shape, attention_rows(shape[1])),
                     lambda x, mode, s: softmax_attention(x, mode, s.rows or ()))


def reference_for(name: str) -> Reference:
    """The reference called `name`: ``"softmax_attention"``, or a registered op's name (its own numpy backend on the
    corner slice, slow enough at the benchmark shapes to go to a worker process)."""
    if name == "softmax_attention":
        return _SOFTMAX
    return Reference(GateSlice.corners, lambda x, mode, s: op_outputs(name, x, mode), offload=True)


def expected_outputs(reference: str, host: dict[str, Any], shape: Shape, mode: str) -> Expected:
    """Float64 reference outputs on the gate slice of the full host inputs `host`."""
    ref = reference_for(reference)
    sl = ref.gate_slice(shape)
    return ref.compute(sl.cut_inputs(host), mode, sl)


def reference_job(reference: str, op_name: str, shape: Shape, mode: str, dtype: str, seed: int) -> Expected:
    """:func:`expected_outputs` after regenerating the inputs (runs in a worker process)."""
    from .registry import OPS

    op = next(o for o in OPS if o.name == op_name)
    return expected_outputs(reference, host_inputs(op, shape, mode, dtype, seed), shape, mode)


@dataclass
class GateResult:
    """Verdict of the gate: relative RMS error per compared output, and the first failure's message."""

    passed: bool
    errors: dict[str, float | None] = field(default_factory=dict)
    detail: str = ""


def gate(outputs: dict[str, Any], expected: Expected, sl: GateSlice, dtype: str) -> GateResult:
    """Compare `outputs` (full arrays, any library) on slice `sl` with `expected` (float64, already sliced)."""
    res = GateResult(True)
    for name, ref in expected.items():
        if outputs.get(name) is None:
            res.passed, res.errors[name] = False, None
            res.detail = res.detail or f"{name}: the implementation returned none"
            continue
        try:
            got = sl.host(name, outputs[name])
            rel = error_stats(ref, got)[0]
            res.errors[name] = None if np.isnan(rel) else rel
            assert_close(name, ref, got, dtype=np_dtype(dtype))
        except AssertionError as e:
            res.passed = False
            res.detail = res.detail or str(e)
    return res
