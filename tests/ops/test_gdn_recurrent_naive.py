"""The float64 NumPy reference of the recurrent gated delta rule (naive.py, the ``numpy`` backend).

- Its hand-written backward against float64 central finite differences of
  ``L = sum(o * do) + sum(ht * dht)``, every element of every gradient, for every option of the family.
- Its forward against an independent plain-Python per-column loop written here from README.md.
- The public reference ``naive_recurrent_gated_delta_rule`` keeps the peer's argument order (beta before g).
The contract tests (tests/contract) hold what every op shares: dtypes, validation, the adapters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops.gated_delta_rule import naive
from rawdelta.ops.gated_delta_rule.definition import GDNProblem
from rawdelta.testing import assert_close, gated_delta_rule_inputs

from .gdn_cases import GRAD_NAMES, check_against_fd, make_problem


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 1
    T: int = 5
    H: int = 1
    HV: int = 1
    K: int = 3
    V: int = 4
    seqlens: tuple[int, ...] | None = None
    g: bool = True
    gk: bool = False
    gv: bool = False
    beta: str | None = "scalar"  # "scalar" [B, T, HV], "perv" [B, T, HV, V], None
    h0: bool = True
    l2norm: bool = False
    sigmoid: bool = False
    neg_eigval: bool = False
    gate_in_kernel: bool = False
    dt_bias: bool = True
    scale: float | None = None
    seed: int = 0

    @property
    def id(self) -> str:
        T = sum(self.seqlens) if self.seqlens is not None else self.T
        parts = [f"B{self.B}-T{T}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}"]
        gates = [n for n in ("g", "gk", "gv") if getattr(self, n)]
        parts.append("+".join(gates) if gates else "nogate")
        parts.append(f"beta-{self.beta}")
        if not self.h0:
            parts.append("noh0")
        if self.seqlens is not None:
            parts.append("varlen" + "_".join(map(str, self.seqlens)))
        if self.l2norm:
            parts.append("l2norm")
        if self.sigmoid:
            parts.append("sigmoid-neg" if self.neg_eigval else "sigmoid")
        if self.gate_in_kernel:
            parts.append("gatek" + ("-dtbias" if self.dt_bias else "-nodtbias"))
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


CASES = [
    Case(),  # g only
    Case(B=2, T=4, K=3, V=2, g=False, gk=True),
    Case(T=4, g=False, gv=True),
    Case(g=True, gk=True, gv=True),
    Case(g=False),  # plain delta rule
    Case(beta="perv", gk=True),
    Case(beta=None),
    Case(beta=None, g=False, gk=True, gv=True, h0=False),
    Case(l2norm=True, HV=2, H=1),
    Case(sigmoid=True),
    Case(sigmoid=True, neg_eigval=True, beta="perv"),
    Case(gate_in_kernel=True),
    Case(gate_in_kernel=True, dt_bias=False, B=2, T=3),
    Case(h0=False),
    Case(H=1, HV=2, K=2, V=3, gk=True),
    Case(H=2, HV=4, K=2, V=2, T=3, gv=True, beta="perv"),
    Case(seqlens=(3, 0, 4), HV=2, gk=True),
    Case(seqlens=(0, 2, 0), h0=True),
    Case(T=1, gk=True, gv=True),
    Case(T=1, h0=False, B=2),
    Case(K=4, V=2, T=4, scale=0.7),
    Case(K=2, V=4, T=4),
    Case(B=1, seqlens=(2, 0, 3), H=1, HV=2, K=3, V=2, g=True, gk=True, gv=True, beta="perv", l2norm=True,
         sigmoid=True, neg_eigval=True, gate_in_kernel=True, seed=3),
]


def case_params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


def build(c: Case, dtype: Any = "float64") -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Keyword arguments for make_problem / the op (float64 gates for the float64 reference), do, dht."""
    inp = gated_delta_rule_inputs(
        c.B, c.T, c.H, c.K, c.V, HV=c.HV, dtype=dtype, seed=c.seed, seqlens=list(c.seqlens) if c.seqlens else None,
        g=c.g, gk=c.gk, gv=c.gv, beta=c.beta is not None, beta_per_v=c.beta == "perv", initial_state=c.h0,
        use_qk_l2norm_in_kernel=c.l2norm, use_gate_in_kernel=c.gate_in_kernel, use_beta_sigmoid_in_kernel=c.sigmoid,
    )
    do, dht = inp.pop("do"), inp.pop("dht")
    if c.gate_in_kernel and not c.dt_bias:
        inp.pop("dt_bias")
    if c.neg_eigval:
        inp["allow_neg_eigval"] = True
    if c.scale is not None:
        inp["scale"] = c.scale
    if np.dtype(dtype) == np.float64:
        inp = {n: (a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a)
               for n, a in inp.items()}
        do, dht = do.astype(np.float64), dht.astype(np.float64)
    return inp, do, dht


def problem(c: Case) -> tuple[GDNProblem, np.ndarray, np.ndarray]:
    kw, do, dht = build(c)
    return make_problem(**kw, backend="numpy"), do, dht


@pytest.mark.parametrize("c", case_params(CASES))
def test_backward_matches_finite_differences(c: Case) -> None:
    p, do, dht = problem(c)
    check_against_fd(p, do, dht, naive.recurrent_forward, naive.recurrent_backward)


@pytest.mark.parametrize("c", case_params([Case(gk=True, gv=True), Case(seqlens=(3, 0, 2), HV=2, beta="perv")]))
def test_backward_without_dht_matches_finite_differences(c: Case) -> None:
    p, do, _ = problem(c)
    check_against_fd(p, do, None, naive.recurrent_forward, naive.recurrent_backward)


def test_dht_none_equals_zero_dht() -> None:
    p, do, dht = problem(Case(gk=True, HV=2))
    g_none = naive.recurrent_backward(p, do, None)
    g_zero = naive.recurrent_backward(p, do, np.zeros_like(dht))
    for name in GRAD_NAMES:
        if g_none.get(name) is not None:
            np.testing.assert_array_equal(g_none[name], g_zero[name])


def test_empty_sequence_passes_state_and_cotangent_through() -> None:
    p, do, dht = problem(Case(seqlens=(3, 0, 4), HV=2))
    _, ht = naive.recurrent_forward(p)
    np.testing.assert_array_equal(ht[1], p.initial_state[1])
    grads = naive.recurrent_backward(p, do, dht)
    np.testing.assert_array_equal(grads["initial_state"][1], dht[1])
    p0, _, _ = problem(Case(seqlens=(3, 0, 4), HV=2, h0=False))
    _, ht0 = naive.recurrent_forward(p0)
    np.testing.assert_array_equal(ht0[1], 0.0)


def test_softplus_threshold_in_gate() -> None:
    """Above 20 the softplus is the identity, so g = -exp(A_log) * x exactly."""
    p, _, _ = problem(Case(gate_in_kernel=True, dt_bias=False, T=2, HV=2, H=1))
    g_raw = np.array([[[25.0, -3.0], [20.5, 0.0]]])
    A_log = np.array([0.3, -0.2])
    x = naive.prepare_inputs(p.replace(g=g_raw, A_log=A_log))
    a = np.exp(A_log)
    expected = -a * np.array([[[25.0, math.log1p(math.exp(-3.0))], [20.5, math.log(2.0)]]])
    np.testing.assert_allclose(x.g, expected, rtol=1e-15)


# An independent plain-Python implementation, one value column at a time, written from README.md.


def _column_loop_reference(kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    q, k, v = kw["q"].tolist(), kw["k"].tolist(), kw["v"].tolist()
    B, T, H, K = kw["q"].shape
    HV, V = kw["v"].shape[2], kw["v"].shape[3]
    scale = kw.get("scale") or K ** -0.5
    cu = kw.get("cu_seqlens")
    if cu is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    h0 = kw.get("initial_state")
    g, gk, gv, beta = kw.get("g"), kw.get("gk"), kw.get("gv"), kw.get("beta")
    A_log, dt_bias = kw.get("A_log"), kw.get("dt_bias")

    def norm(x: list[float]) -> list[float]:
        if not kw.get("use_qk_l2norm_in_kernel"):
            return x
        r = 1.0 / math.sqrt(sum(e * e for e in x) + 1e-6)
        return [e * r for e in x]

    def beta_of(b: int, t: int, hv: int, j: int) -> float:
        if beta is None:
            return 1.0
        raw = float(beta[b, t, hv, j]) if beta.ndim == 4 else float(beta[b, t, hv])
        if kw.get("use_beta_sigmoid_in_kernel"):
            return (2.0 if kw.get("allow_neg_eigval") else 1.0) / (1.0 + math.exp(-raw))
        return raw

    def gate_of(b: int, t: int, hv: int) -> float:
        if g is None:
            return 0.0
        if not kw.get("use_gate_in_kernel"):
            return float(g[b, t, hv])
        xx = float(g[b, t, hv]) + (0.0 if dt_bias is None else float(dt_bias[hv]))
        sp = xx if xx > 20 else math.log(1.0 + math.exp(xx))
        return -math.exp(float(A_log[hv])) * sp

    o = np.zeros((B, T, HV, V))
    ht = np.zeros((len(seqs), HV, K, V))
    for n, (b, s, e) in enumerate(seqs):
        for hv in range(HV):
            h = hv // (HV // H)
            for j in range(V):
                col = [float(h0[n, hv, i, j]) if h0 is not None else 0.0 for i in range(K)]
                for t in range(s, e):
                    kt, qt = norm(k[b][t][h]), norm(q[b][t][h])
                    for i in range(K):
                        logd = gate_of(b, t, hv)
                        logd += float(gk[b, t, hv, i]) if gk is not None else 0.0
                        logd += float(gv[b, t, hv, j]) if gv is not None else 0.0
                        col[i] *= math.exp(logd)
                    u = v[b][t][hv][j] - sum(col[i] * kt[i] for i in range(K))
                    d = beta_of(b, t, hv, j) * u
                    col = [col[i] + kt[i] * d for i in range(K)]
                    o[b, t, hv, j] = sum(col[i] * scale * qt[i] for i in range(K))
                for i in range(K):
                    ht[n, hv, i, j] = col[i]
    return o, ht


@pytest.mark.parametrize("c", case_params([
    CASES[-1],
    Case(B=2, T=4, H=2, HV=4, K=3, V=2, g=True, gk=True, gv=True, beta="scalar", scale=0.5, seed=5),
    Case(T=3, g=False, beta=None, h0=False, K=2, V=3),
]))
def test_forward_matches_column_loop(c: Case) -> None:
    kw, _, _ = build(c)
    o_ref, ht_ref = _column_loop_reference(kw)
    o, ht = naive.recurrent_forward(make_problem(**kw, backend="numpy"))
    assert_close("o", o_ref, o, ratio=1e-13)
    assert_close("ht", ht_ref, ht, ratio=1e-13)


# Public entry points.


def _naive_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {n: a for n, a in kw.items() if n not in ("q", "k", "v", "g", "beta")}


def test_naive_public_argument_order_beta_before_g() -> None:
    kw, do, dht = build(CASES[-1])
    rest = _naive_kwargs(kw)
    o, ht = rawdelta.naive_recurrent_gated_delta_rule(kw["q"], kw["k"], kw["v"], kw["beta"], kw["g"],
                                                      output_final_state=True, **rest)
    p = make_problem(**kw, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)
    np.testing.assert_array_equal(o, o_ref)
    np.testing.assert_array_equal(ht, ht_ref)
    o2, none = rawdelta.naive_recurrent_gated_delta_rule(kw["q"], kw["k"], kw["v"], kw["beta"], kw["g"], **rest)
    assert none is None
    np.testing.assert_array_equal(o2, o_ref)

    grads = rawdelta.naive_recurrent_gated_delta_rule_bwd(kw["q"], kw["k"], kw["v"], kw["beta"], kw["g"],
                                                          do=do, dht=dht, **rest)
    assert isinstance(grads, rawdelta.GatedDeltaRuleGrads)
    ref = naive.recurrent_backward(p, do, dht)
    for name in GRAD_NAMES:
        np.testing.assert_array_equal(getattr(grads, name), ref[name])


# Resets: a gate of -inf in some keys (gk) or values (gv) zeroes those rows or columns of the decayed state, exactly
# as the recurrence defines it; very negative finite gates are the same reset.


def _with_partial_resets(kw: dict[str, Any], value: float) -> dict[str, Any]:
    """gk at a few (token, head, key) entries and gv at a few (token, head, value) entries set to `value`."""
    kw = dict(kw)
    if kw.get("gk") is not None:
        kw["gk"] = kw["gk"].copy()
        kw["gk"][0, 1, 0, 0] = kw["gk"][0, 3, -1, 1:] = kw["gk"][-1, -1, 0, -1] = value
    if kw.get("gv") is not None:
        kw["gv"] = kw["gv"].copy()
        kw["gv"][0, 2, 0, 1] = kw["gv"][0, 3, -1, :-1] = value
    return kw


PARTIAL_RESET_CASES = [Case(T=5, H=1, HV=2, K=3, V=4, gk=True, gv=True), Case(B=2, T=4, g=False, gk=True, seed=2),
                       Case(T=5, H=1, HV=2, K=3, V=2, gv=True, beta="perv", seed=4)]


@pytest.mark.parametrize("value", [-np.inf, -1e30, -1e4], ids=["-inf", "-1e30", "-1e4"])
@pytest.mark.parametrize("c", case_params(PARTIAL_RESET_CASES))
def test_partial_resets_match_column_loop_and_finite_differences(c: Case, value: float) -> None:
    kw, do, dht = build(c)
    kw = _with_partial_resets(kw, value)
    o_ref, ht_ref = _column_loop_reference(kw)
    p = make_problem(**kw, backend="numpy")
    o, ht = naive.recurrent_forward(p)
    assert_close("o", o_ref, o, ratio=1e-13)
    assert_close("ht", ht_ref, ht, ratio=1e-13)
    check_against_fd(p, do, dht, naive.recurrent_forward, naive.recurrent_backward)
    grads = naive.recurrent_backward(p, do, dht)
    for name in ("gk", "gv"):
        if kw.get(name) is not None:
            reset = np.exp(kw[name]) == 0
            assert reset.any() and np.all(grads[name][reset] == 0), f"d{name} at a reset"


def test_very_negative_gates_equal_minus_inf_exactly() -> None:
    kw, do, dht = build(Case(T=6, H=1, HV=2, K=3, V=4, gk=True, gv=True))
    results = []
    for value in (-np.inf, -1e30, -1e4):
        x = _with_partial_resets(kw, value)
        x["g"] = x["g"].copy()
        x["g"][0, 2, :] = value
        p = make_problem(**x, backend="numpy")
        results.append((*naive.recurrent_forward(p), naive.recurrent_backward(p, do, dht)))
    for o, ht, grads in results[1:]:
        np.testing.assert_array_equal(o, results[0][0])
        np.testing.assert_array_equal(ht, results[0][1])
        for name, gr in grads.items():
            if gr is not None:
                np.testing.assert_array_equal(gr, results[0][2][name], err_msg=name)
