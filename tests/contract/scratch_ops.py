"""Two ops written the way a contributor adds one, to measure what a new op costs and to prove that the machinery
derives everything else: a linear-recurrent op with a state (simple GLA: a scalar gate, no delta correction) and an
op that returns ``o`` only (causal softmax attention, as DeltaFormer's second stage). Each has its math (a float64
numpy backend: forward and hand-written backward), its input generator and its declaration; nothing else.
tests/contract/test_new_op.py registers them and runs the derived API, adapters, checks and contract tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rawdelta.ops.common.inputs import float_dtype, logsigmoid
from rawdelta.ops.common.opdef import KEYWORD_ONLY, Array, Backend, BenchSpec, CheckCase, Family, OpCase, OpDef, Output
from rawdelta.ops.common.problem import Problem

# ---- math: simple GLA, S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t (the numpy backend) -------------


def _f64(x: Any) -> Any:
    return None if x is None else np.asarray(x, np.float64)


def _states(p: Problem, n: int) -> tuple[list[np.ndarray], tuple[int, int, int]]:
    b, s, e = p.seq_bounds[n]
    S = _f64(p.initial_state)[n] if p.initial_state is not None else np.zeros((p.H, p.K, p.V))
    states = [S]
    for t in range(s, e):
        decay = np.exp(_f64(p.g)[b, t])[:, None, None] if p.g is not None else 1.0
        states.append(decay * states[-1] + _f64(p.k)[b, t][:, :, None] * _f64(p.v)[b, t][:, None, :])
    return states, (b, s, e)


def forward(p: Problem, workspace: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], None]:
    o, ht = np.zeros((p.B, p.T, p.H, p.V)), np.zeros((p.N, p.H, p.K, p.V))
    for n in range(p.N):
        states, (b, s, e) = _states(p, n)
        for t in range(s, e):
            o[b, t] = p.scale * np.einsum("hk,hkv->hv", _f64(p.q)[b, t], states[t - s + 1])
        ht[n] = states[-1]
    return (o, ht), None


def backward(p: Problem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    q, k, v, g, do = _f64(p.q), _f64(p.k), _f64(p.v), _f64(p.g), _f64(do)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dg = np.zeros((p.B, p.T, p.H))
    dh0 = np.zeros((p.N, p.H, p.K, p.V))
    for n in range(p.N):
        states, (b, s, e) = _states(p, n)
        dS = _f64(dht)[n] if dht is not None else np.zeros((p.H, p.K, p.V))
        for t in range(e - 1, s - 1, -1):
            dS = dS + p.scale * q[b, t][:, :, None] * do[b, t][:, None, :]
            dq[b, t] = p.scale * np.einsum("hkv,hv->hk", states[t - s + 1], do[b, t])
            dk[b, t] = np.einsum("hkv,hv->hk", dS, v[b, t])
            dv[b, t] = np.einsum("hkv,hk->hv", dS, k[b, t])
            decay = np.exp(g[b, t])[:, None, None] if g is not None else 1.0
            dg[b, t] = np.sum(dS * decay * states[t - s], axis=(1, 2))
            dS = decay * dS
        dh0[n] = dS
    return {"q": dq, "k": dk, "v": dv, "g": dg if g is not None else None,
            "initial_state": dh0 if p.initial_state is not None else None}


def scratch_inputs(B: int, T: int, H: int, K: int, V: int, *, dtype: Any = "float32", seed: int = 0,
                   seqlens: Sequence[int] | None = None, g: bool = True, initial_state: bool = True) -> dict[str, Any]:
    """Random inputs ``[B, T, H, K|V]`` (gates ``logsigmoid(randn)``), cotangents ``do`` and ``dht``."""
    rng = np.random.default_rng(seed)
    if seqlens is not None:
        T = int(sum(seqlens))
    N = B if seqlens is None else len(seqlens)
    out: dict[str, Any] = {n: rng.standard_normal((B, T, H, d)).astype(float_dtype(dtype))
                           for n, d in (("q", K), ("k", K), ("v", V))}
    if g:
        out["g"] = logsigmoid(rng.standard_normal((B, T, H))).astype(np.float32)
    if initial_state:
        out["initial_state"] = rng.standard_normal((N, H, K, V)).astype(np.float32)
    if seqlens is not None:
        out["cu_seqlens"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)
    out["do"] = rng.standard_normal((B, T, H, V)).astype(np.float32)
    out["dht"] = rng.standard_normal((N, H, K, V)).astype(np.float32)
    return out


# ---- math: causal softmax attention, o only ---------------------------------------------------------------------


def attention_forward(p: Problem, workspace: Any = None) -> tuple[tuple[np.ndarray], None]:
    return (_attention(p)[0],), None


def _attention(p: Problem) -> tuple[np.ndarray, list[Any]]:
    o, parts = np.zeros((p.B, p.T, p.H, p.V)), []
    for b, s, e in p.seq_bounds:
        q, k, v = (_f64(x)[b, s:e] for x in (p.q, p.k, p.v))
        scores = np.einsum("thd,uhd->htu", q, k) * p.scale
        scores = np.where(np.tril(np.ones((e - s, e - s), bool)), scores, -np.inf)
        prob = np.exp(scores - scores.max(-1, keepdims=True)) if e > s else scores
        prob = prob / prob.sum(-1, keepdims=True) if e > s else prob
        o[b, s:e] = np.einsum("htu,uhv->thv", prob, v)
        parts.append((b, s, e, q, k, v, prob))
    return o, parts


def attention_backward(p: Problem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    _, parts = _attention(p)
    dq, dk, dv = np.zeros(p.q.shape), np.zeros(p.k.shape), np.zeros(p.v.shape)
    for b, s, e, q, k, v, prob in parts:
        d = _f64(do)[b, s:e]
        dp = np.einsum("thv,uhv->htu", d, v)
        ds = prob * (dp - np.sum(dp * prob, -1, keepdims=True))
        dq[b, s:e] = np.einsum("htu,uhd->thd", ds, k) * p.scale
        dk[b, s:e] = np.einsum("htu,thd->uhd", ds, q) * p.scale
        dv[b, s:e] = np.einsum("htu,thv->uhv", prob, d)
    return {"q": dq, "k": dk, "v": dv}


# ---- declarations -------------------------------------------------------------------------------------------------

_SHAPE = ("B", "T", "H")
FAMILY = Family(
    name="scratch", title="Scratch", grads_name="ScratchGrads", grads_doc="Gradients of a scratch op.",
    arrays=(Array("q", (*_SHAPE, "K"), "queries", required=True),
            Array("k", (*_SHAPE, "K"), "keys, same dtype as q", required=True),
            Array("v", (*_SHAPE, "V"), "values, same dtype as q", required=True),
            Array("g", _SHAPE, "log-decay", float32=True, absent="no decay"),
            Array("initial_state", ("N", "H", "K", "V"), "initial state", float32=True, state=True, absent="zeros")),
    problem=Problem, check=None, inputs=f"{__name__}:scratch_inputs")
_CASES = (OpCase("tiny", {"B": 2, "T": 3, "H": 1, "K": 2, "V": 3}, adapters=True),
          OpCase("varlen", {"B": 1, "T": 0, "H": 2, "K": 3, "V": 2, "seqlens": (2, 0, 3)}, adapters=True))
SIMPLE_GLA = OpDef(
    name="fused_recurrent_simple_gla", family=FAMILY, mode="recurrent",
    signature=("q", "k", "v", "g", "scale", "initial_state", "output_final_state", "cu_seqlens", KEYWORD_ONLY,
               "cu_seqlens_cpu", "backend", "stream"),
    options=(), outputs=(Output("o", (*_SHAPE, "V"), "v"), Output("final_state", ("N", "H", "K", "V"), None)),
    summary="Simple GLA, token by token.", doc="``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.",
    backends={"numpy": Backend(__name__)}, check_cases=(CheckCase("tiny", {"B": 2, "T": 3, "H": 1, "K": 2, "V": 3}),),
    cases=_CASES, bench=BenchSpec(("forward",), "softmax_attention"))
ATTENTION = OpDef(
    name="scratch_causal_attention", family=FAMILY, mode="parallel",
    signature=("q", "k", "v", "scale", "cu_seqlens", KEYWORD_ONLY, "cu_seqlens_cpu", "backend", "stream"),
    options=(), outputs=(Output("o", (*_SHAPE, "V"), "v"),), summary="Causal softmax attention.", doc="",
    backends={"numpy": Backend(f"{__name__}_attention")}, cases=_CASES)
