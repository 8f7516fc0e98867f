"""What the recurrent and chunked modes share around a backend call: output casting, cotangent checks,
gradient casting, and the stream context.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np

from ..._arrays import as_array, contiguous, on_stream
from ..._validate import Validator
from .problem import GDNProblem


class GatedDeltaRuleGrads(NamedTuple):
    """Gradients of a gated-delta-rule call; None where the input was None (or has no gradient).

    Each has the shape and dtype of its input, except ``initial_state`` (dh0), which is float32. With
    ``use_qk_l2norm_in_kernel``, ``use_beta_sigmoid_in_kernel`` or ``use_gate_in_kernel`` the gradients are
    taken w.r.t. the raw inputs (before the normalisation, the sigmoid, the gate activation).

    Attributes:
        q: dq ``[B, T, H, K]``, summed over the value heads sharing each key head.
        k: dk ``[B, T, H, K]``, summed likewise.
        v: dv ``[B, T, HV, V]``.
        g: dg ``[B, T, HV]`` (w.r.t. the raw gate with ``use_gate_in_kernel``).
        gk: dgk ``[B, T, HV, K]`` (recurrent mode only; always None in the chunked mode).
        gv: dgv ``[B, T, HV, V]`` (recurrent mode only; always None in the chunked mode).
        beta: dbeta, shaped like beta (w.r.t. the logits with ``use_beta_sigmoid_in_kernel``).
        initial_state: dh0 ``[N, HV, K, V]``, float32.
        A_log: dA_log ``[HV]``.
        dt_bias: ddt_bias ``[HV]``.
    """

    q: Any
    k: Any
    v: Any
    g: Any
    gk: Any
    gv: Any
    beta: Any
    initial_state: Any
    A_log: Any
    dt_bias: Any


def backend_stream(p: GDNProblem) -> Any:
    """The caller's stream for the cuda backend; a no-op context for the others."""
    return on_stream(p.stream) if p.backend == "cuda" else contextlib.nullcontext()


def cast_outputs(p: GDNProblem, o: Any, ht: Any) -> tuple[Any, Any]:
    """Bring a backend's outputs to the contract dtypes: o like v, final state float32 (float64 for float64 input)."""
    o_dt = np.dtype(p.v.dtype)
    st_dt = np.float64 if o_dt == np.float64 else np.float32
    o = o if o.dtype == o_dt else o.astype(o_dt)
    if ht is not None and ht.dtype != st_dt:
        ht = ht.astype(st_dt)
    return o, ht


def check_cotangents(p: GDNProblem, do: Any, dht: Any) -> tuple[Any, Any]:
    """Validate ``do`` ``[B, T, HV, V]`` and ``dht`` ``[N, HV, K, V]`` against the forward; contiguous copies."""
    val = Validator()
    do = contiguous(as_array("do", do))
    dht = None if dht is None else contiguous(as_array("dht", dht))
    dims = {"B": p.B, "T": p.T, "HV": p.HV, "V": p.V, "N": p.N, "K": p.K}
    val.shape("do", do, ("B", "T", "HV", "V"), dims)
    if dht is not None:
        val.shape("dht", dht, ("N", "HV", "K", "V"), dims)
    if type(do) is not type(p.q) or (dht is not None and type(dht) is not type(p.q)):
        val.type_error("do and dht must live where the forward inputs live (all host or all device)")
    val.raise_if_any()
    return do, dht


def cast_grads(p: GDNProblem, grads: dict[str, Any]) -> GatedDeltaRuleGrads:
    """Cast a backend's gradients to their inputs' dtypes (dh0 float32; float64 stays float64)."""
    out = {}
    for name in GatedDeltaRuleGrads._fields:
        gr = grads.get(name)
        if gr is None or getattr(p, name) is None:
            out[name] = None
            continue
        dt = np.dtype(np.float32) if name == "initial_state" else p.input_dtypes[name]
        if p.input_dtypes[name] == np.float64:
            dt = np.dtype(np.float64)
        out[name] = gr if gr.dtype == dt else gr.astype(dt)
    return GatedDeltaRuleGrads(**out)
