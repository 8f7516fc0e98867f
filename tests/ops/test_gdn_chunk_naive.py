"""The float64 NumPy reference of the CHUNKED gated delta rule (naive_chunk.py) and the shared chunk stages.

- The chunked forward equals the recurrent reference (naive.py) to 1e-12 and every gradient of the
  hand-written chunked backward equals the recurrent one to 1e-10, for every chunked option and shape,
  chunk sizes 16, 32 and 64, with and without dht; the op ``chunk_gated_delta_rule(backend="numpy")`` too.
- The chunked backward against float64 central finite differences of the chunked forward, every element.
- The stages of ``rawdelta/ops/common/chunk_stages.py`` in both gate forms (scalar per head, per key)
  against direct token loops, and a GLA-style composition of them (no WY stage) against finite differences.
- The public references ``naive_chunk_gated_delta_rule(_bwd)``: argument order, results, validation.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops.common import chunk_stages as cs
from rawdelta.ops.gated_delta_rule import naive, naive_chunk
from rawdelta.ops.gated_delta_rule.definition import GDNProblem
from rawdelta.testing import gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from ..contract._ops import FD_STEP
from .gdn_cases import (
    CHUNK_OPTIONS,
    CHUNK_SHAPES,
    FD_RTOL,
    check_against_fd,
    check_backend,
    make_inputs,
    make_problem,
)

OUT_RTOL = 1e-12  # max-abs error relative to max|ref|, chunked vs recurrent reference
GRAD_RTOL = 1e-10


def _float64(inputs: dict[str, Any]) -> dict[str, Any]:
    """Every floating array in float64 (the generator keeps gates, beta and h0 in float32)."""
    return {n: (a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a)
            for n, a in inputs.items()}


def _op_args(inputs: dict[str, Any], drop: tuple[str, ...], extra: dict[str, Any], use_dht: bool = True
             ) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    kw, do, dht = split_op_args(inputs)
    for name in drop:
        kw.pop(name)
    kw.update(extra)
    return kw, do, (dht if use_dht else None)


def _assert_max_rel(name: str, ref: np.ndarray, out: np.ndarray, rtol: float) -> None:
    assert out.shape == ref.shape and out.dtype == np.float64, (name, out.shape, out.dtype)
    err = float(np.max(np.abs(out - ref), initial=0.0))
    bound = rtol * float(np.max(np.abs(ref), initial=0.0))
    assert err <= bound, f"{name}: max-abs error {err:.3e} > {bound:.3e}"


def check_chunk_equals_recurrent(inputs: dict[str, Any], chunk_size: int, *, use_dht: bool = True,
                                 drop: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> None:
    """naive_chunk against naive (recurrent), tight bounds, then the op through check_backend (float64 row)."""
    kw, do, dht = _op_args(inputs, drop, extra or {}, use_dht)
    p = make_problem("chunk", **kw, output_final_state=True, chunk_size=chunk_size)
    o_ref, ht_ref = naive.recurrent_forward(p)
    o, ht = naive_chunk.chunk_forward(p, chunk_size)
    _assert_max_rel("o", o_ref, o, OUT_RTOL)
    _assert_max_rel("ht", ht_ref, ht, OUT_RTOL)
    ref = naive.recurrent_backward(p, do, dht)
    got = naive_chunk.chunk_backward(p, chunk_size, do, dht)
    assert set(got) == set(ref)
    for name, r in ref.items():
        if r is None:
            assert got[name] is None, f"d{name} should be absent"
        else:
            _assert_max_rel(f"d{name}", r, got[name], GRAD_RTOL)
    check_backend("numpy", inputs, use_dht=use_dht, drop=drop, mode="chunk", chunk_size=chunk_size, **(extra or {}))


# 1. Chunked == recurrent.


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in CHUNK_SHAPES], ids=[s[0] for s in CHUNK_SHAPES])
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in CHUNK_OPTIONS], ids=[o[0] for o in CHUNK_OPTIONS])
def test_chunk16_equals_recurrent(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...],
                                  shape: dict[str, Any], use_dht: bool) -> None:
    inputs = _float64(make_inputs(shape, seed=11, **gen))
    check_chunk_equals_recurrent(inputs, 16, use_dht=use_dht, drop=drop, extra=extra)


_ALL_CHUNK_OPTIONS = {"use_qk_l2norm_in_kernel": True, "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}

# (name, chunk size, shape and generator options, extra op arguments)
LARGER_CHUNK_CASES = [
    ("T70_c64_grouped", 64, {"B": 1, "T": 70, "H": 2, "HV": 4, "K": 8, "V": 6}, {}),
    ("T45_c32_l2norm", 32, {"B": 2, "T": 45, "H": 1, "K": 5, "V": 4, "use_qk_l2norm_in_kernel": True}, {}),
    ("T100_c64_no_gates", 64, {"B": 1, "T": 100, "H": 1, "K": 8, "V": 4, "g": False}, {}),
    ("varlen_c32_all", 32, {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 6, "V": 5, "seqlens": (40, 0, 70, 5),
                            **_ALL_CHUNK_OPTIONS}, {"allow_neg_eigval": True}),
    ("varlen_c64_all", 64, {"B": 1, "T": 0, "H": 2, "HV": 2, "K": 4, "V": 3, "seqlens": (64, 65, 0, 130),
                            **_ALL_CHUNK_OPTIONS}, {"allow_neg_eigval": True}),
]


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize(("chunk_size", "shape", "extra"), [c[1:] for c in LARGER_CHUNK_CASES],
                         ids=[c[0] for c in LARGER_CHUNK_CASES])
def test_larger_chunks_equal_recurrent(chunk_size: int, shape: dict[str, Any], extra: dict[str, Any],
                                       use_dht: bool) -> None:
    check_chunk_equals_recurrent(_float64(make_inputs(shape, seed=12)), chunk_size, use_dht=use_dht,
                                 extra=extra)


def test_op_float32_inputs_on_numpy_backend() -> None:
    """float32 inputs through chunk_gated_delta_rule(backend="numpy"): float32 outputs, float32 tolerance."""
    check_backend("numpy", gated_delta_rule_inputs(1, 40, 1, 4, 3, HV=2, seed=13), mode="chunk", chunk_size=32)


# 2. Chunked backward against finite differences of the chunked forward.

FD_CHUNK = 16

# (name, shape and generator options, extra op arguments, inputs dropped)
FD_CASES = [
    ("g", {"B": 2, "T": 20, "H": 1, "K": 3, "V": 4}, {}, ()),
    ("plain_delta_rule", {"B": 1, "T": 19, "H": 1, "K": 4, "V": 3, "g": False, "beta": False,
                          "initial_state": False}, {}, ()),
    ("l2norm_grouped", {"B": 1, "T": 21, "H": 1, "HV": 2, "K": 3, "V": 3, "use_qk_l2norm_in_kernel": True}, {}, ()),
    ("beta_sigmoid_neg_eigval", {"B": 1, "T": 18, "H": 1, "K": 5, "V": 3, "use_beta_sigmoid_in_kernel": True},
     {"allow_neg_eigval": True, "scale": 0.7}, ()),
    ("gate_in_kernel", {"B": 1, "T": 20, "H": 1, "HV": 2, "K": 3, "V": 3, "use_gate_in_kernel": True}, {}, ()),
    ("gate_in_kernel_no_dt_bias", {"B": 1, "T": 17, "H": 1, "K": 3, "V": 4, "use_gate_in_kernel": True}, {},
     ("dt_bias",)),
    ("varlen_empty_grouped", {"B": 1, "T": 0, "H": 2, "HV": 4, "K": 3, "V": 2, "seqlens": (17, 0, 4)}, {}, ()),
    ("varlen_everything", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 3, "V": 4, "seqlens": (0, 18, 3, 0),
                           **_ALL_CHUNK_OPTIONS}, {"allow_neg_eigval": True}, ()),
]

_chunk_forward = functools.partial(naive_chunk.chunk_forward, chunk_size=FD_CHUNK)


def _chunk_backward(p: GDNProblem, do: np.ndarray, dht: np.ndarray | None) -> dict[str, Any]:
    return naive_chunk.chunk_backward(p, FD_CHUNK, do, dht)


def _fd_problem(shape: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...], use_dht: bool
                ) -> tuple[GDNProblem, np.ndarray, np.ndarray | None]:
    kw, do, dht = _op_args(_float64(make_inputs(shape, seed=21)), drop, extra, use_dht)
    return make_problem("chunk", **kw, chunk_size=FD_CHUNK), do, dht


@pytest.mark.parametrize(("shape", "extra", "drop"), [c[1:] for c in FD_CASES], ids=[c[0] for c in FD_CASES])
def test_backward_matches_finite_differences(shape: dict[str, Any], extra: dict[str, Any],
                                             drop: tuple[str, ...]) -> None:
    check_against_fd(*_fd_problem(shape, extra, drop, True), _chunk_forward, _chunk_backward)


@pytest.mark.parametrize(("shape", "extra", "drop"), [c[1:] for c in FD_CASES[::7]], ids=[c[0] for c in FD_CASES[::7]])
def test_backward_without_dht_matches_finite_differences(shape: dict[str, Any], extra: dict[str, Any],
                                                         drop: tuple[str, ...]) -> None:
    check_against_fd(*_fd_problem(shape, extra, drop, False), _chunk_forward, _chunk_backward)


# 3. Shared stages, both gate forms: scalar gate per head [T, H], per-key gate [T, H, K].

GATE_FORMS = ["scalar", "per_key"]
ST, SH, SK, SV, SC = 37, 2, 3, 4, 16  # T crosses two chunk boundaries and ends in a short chunk


def _stage_inputs(form: str, T: int = ST, seed: int = 31) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gate_shape = (T, SH) if form == "scalar" else (T, SH, SK)
    k = rng.standard_normal((T, SH, SK))
    return {
        "q": rng.standard_normal((T, SH, SK)),
        "k": k / np.linalg.norm(k, axis=-1, keepdims=True),
        "v": rng.standard_normal((T, SH, SV)),
        "g": -np.logaddexp(0.0, -rng.standard_normal(gate_shape)),
        "h0": rng.standard_normal((SH, SK, SV)),
        "do": rng.standard_normal((T, SH, SV)),
        "dht": rng.standard_normal((SH, SK, SV)),
    }


def _key_decay(g_t: np.ndarray) -> np.ndarray:
    """``exp(g_t)`` broadcastable to the state ``[H, K, V]`` from a gate row ``[H]`` or ``[H, K]``."""
    return np.exp(g_t)[:, None, None] if g_t.ndim == 1 else np.exp(g_t)[:, :, None]


def _gla_token_loop(x: dict[str, np.ndarray], scale: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """``S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``; returns o and the states S_0 .. S_T."""
    S, states, o = x["h0"], [x["h0"]], np.zeros_like(x["v"])
    for t in range(x["q"].shape[0]):
        S = _key_decay(x["g"][t]) * S + x["k"][t][:, :, None] * x["v"][t][:, None, :]
        o[t] = scale * np.einsum("hk,hkv->hv", x["q"][t], S)
        states.append(S)
    return o, states


@pytest.mark.parametrize("T", [ST, 32, 0])
@pytest.mark.parametrize("form", GATE_FORMS)
def test_chunk_local_cumsum_and_reverse_match_loops(form: str, T: int) -> None:
    g = _stage_inputs(form, T)["g"]
    G = cs.chunk_local_cumsum(g, SC)
    dG = np.random.default_rng(32).standard_normal(g.shape)
    dg = cs.reverse_chunk_local_cumsum(dG, G, SC)
    assert G.shape == dg.shape == g.shape
    assert not G.R.any()
    for t in range(T):
        start, end = (t // SC) * SC, min((t // SC + 1) * SC, T)
        np.testing.assert_allclose(G.G[t], g[start:t + 1].sum(axis=0) / math.log(2.0), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(dg[t], dG[t:end].sum(axis=0), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("form", GATE_FORMS)
def test_state_pass_and_output_match_token_loop(form: str) -> None:
    """Without w the stages are GLA's chunked forward: chunk-start states, final state and o equal the token loop."""
    x = _stage_inputs(form)
    o_ref, states = _gla_token_loop(x, 0.5)
    G = cs.chunk_local_cumsum(x["g"], SC)
    h, delta, ht = cs.state_pass_fwd(x["k"], x["v"], G, x["h0"], SC)
    np.testing.assert_array_equal(delta, x["v"])
    assert h.shape == (3, SH, SK, SV)
    for c in range(3):
        np.testing.assert_allclose(h[c], states[c * SC], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ht, states[-1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cs.chunk_output(x["q"], x["k"], G, h, delta, 0.5, SC), o_ref, rtol=1e-12, atol=1e-13)


def test_state_pass_of_empty_sequence_is_identity() -> None:
    x = _stage_inputs("per_key", T=0)
    G = cs.chunk_local_cumsum(x["g"], SC)
    h, _, ht = cs.state_pass_fwd(x["k"], x["v"], G, x["h0"], SC)
    assert h.shape == (0, SH, SK, SV)
    np.testing.assert_array_equal(ht, x["h0"])
    dh, _, dh0 = cs.state_pass_bwd(x["q"], x["k"], G, x["do"], x["do"], x["dht"], 0.5, SC)
    assert dh.shape == (0, SH, SK, SV)
    np.testing.assert_array_equal(dh0, x["dht"])


def _gla_loss(x: dict[str, np.ndarray], scale: float) -> float:
    o, states = _gla_token_loop(x, scale)
    return float(np.sum(o * x["do"]) + np.sum(states[-1] * x["dht"]))


def _check_stage_backward_against_fd(x: dict[str, np.ndarray], scale: float) -> None:
    """GLA's chunked backward from the shared stages (dv_local, reverse state pass, dq/dk/dG, reverse cumsum) against
    central differences of the token loop, every element (a gate of -inf stays -inf: its difference is 0)."""
    G = cs.chunk_local_cumsum(x["g"], SC)
    h, delta, _ = cs.state_pass_fwd(x["k"], x["v"], G, x["h0"], SC)
    dd_local = cs.chunk_output_dv_local(x["q"], x["k"], G, x["do"], scale, SC)
    dh, dv, dh0 = cs.state_pass_bwd(x["q"], x["k"], G, x["do"], dd_local, x["dht"], scale, SC)
    dq, dk, dG = cs.chunk_qk_grads(x["q"], x["k"], G, h, dh, delta, x["do"], scale, SC)
    assert dG.shape == G.shape
    grads = {"q": dq, "k": dk, "v": dv, "g": cs.reverse_chunk_local_cumsum(dG, G, SC), "h0": dh0}
    for name, gr in grads.items():
        fd = np.empty_like(x[name])
        for i in np.ndindex(fd.shape):
            xp, xm = dict(x), dict(x)
            xp[name], xm[name] = x[name].copy(), x[name].copy()
            xp[name][i] += FD_STEP
            xm[name][i] -= FD_STEP
            fd[i] = (_gla_loss(xp, scale) - _gla_loss(xm, scale)) / (2 * FD_STEP)
        rel = float(np.linalg.norm(gr - fd)) / max(float(np.linalg.norm(fd)), 1e-12)  # dh0 is 0 behind a reset at 0
        assert rel < FD_RTOL, f"d{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("form", GATE_FORMS)
def test_stage_backward_composition_matches_finite_differences(form: str) -> None:
    _check_stage_backward_against_fd(_stage_inputs(form, T=20), 0.5)


# 3b. Resets (a gate whose decay is 0) and non-finite values in the stages and the chunked op.

# Rows of a reset: a chunk's first row, inside, its last row, and several in one chunk (one at t = 0).
RESET_ROWS = {"first_row": (16,), "inside": (20,), "last_row": (31,), "several": (0, 5, 6, 17, 31, 33)}
RESET_VALUES = {"-inf": -np.inf, "-1e30": -1e30, "-1e4": -1e4}


def _with_resets(g: np.ndarray, rows: tuple[int, ...], value: float) -> np.ndarray:
    """g ``[T, H]`` or ``[T, H, K]`` with every head reset at `rows`, per key only key 0 (a partial reset)."""
    g = g.copy()
    for t in rows:
        if g.ndim == 2:
            g[t] = value
        else:
            g[t, :, 0] = value
    return g


def test_chunk_local_cumsum_takes_resets_out() -> None:
    """G sums the gates that are not resets (decay 0 in float64: -inf, -1e30, -800; -700 is not one), R counts the
    resets; dg is 0 at a reset and sums dG up to the next one."""
    rng = np.random.default_rng(33)
    g = -rng.uniform(0.1, 1.0, (ST, SH))
    g[[3, 16, 20, 31], 0] = [-np.inf, -1e30, -800.0, -np.inf]
    g[[5, 6], 1] = [-700.0, -np.inf]
    G = cs.chunk_local_cumsum(g, SC)
    dG = rng.standard_normal(g.shape)
    dg = cs.reverse_chunk_local_cumsum(dG, G, SC)
    reset = np.exp(g) == 0
    np.testing.assert_array_equal(cs.is_reset(g), reset)
    for t in range(ST):
        start, end = (t // SC) * SC, min((t // SC + 1) * SC, ST)
        for h in range(SH):
            kept = [s for s in range(start, t + 1) if not reset[s, h]]
            assert G.R[t, h] == t + 1 - start - len(kept)
            np.testing.assert_allclose(G.G[t, h], g[kept, h].sum() / math.log(2.0), rtol=1e-14, atol=1e-15)
            nxt = next((r for r in range(t + 1, end) if reset[r, h]), end)
            want = 0.0 if reset[t, h] else dG[t:nxt, h].sum()
            np.testing.assert_allclose(dg[t, h], want, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("rows", RESET_ROWS.values(), ids=RESET_ROWS)
@pytest.mark.parametrize("form", GATE_FORMS)
def test_stages_with_resets_match_token_loop(form: str, rows: tuple[int, ...]) -> None:
    """The stages' chunk-start states, final state and o with resets (per key: key 0 only) equal the token loop, and
    -1e30 and -1e4 give the -inf result exactly."""
    x = _stage_inputs(form)
    results = {}
    for label, value in RESET_VALUES.items():
        xr = {**x, "g": _with_resets(x["g"], rows, value)}
        G = cs.chunk_local_cumsum(xr["g"], SC)
        h, delta, ht = cs.state_pass_fwd(xr["k"], xr["v"], G, xr["h0"], SC)
        results[label] = (h, ht, cs.chunk_output(xr["q"], xr["k"], G, h, delta, 0.5, SC))
    o_ref, states = _gla_token_loop({**x, "g": _with_resets(x["g"], rows, -np.inf)}, 0.5)
    h, ht, o = results["-inf"]
    for c in range(3):
        np.testing.assert_allclose(h[c], states[c * SC], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ht, states[-1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-13)
    for label in ("-1e30", "-1e4"):
        for a, b in zip(results[label], results["-inf"]):
            np.testing.assert_array_equal(a, b, err_msg=label)


@pytest.mark.parametrize("rows", [(0, 3, 4), (7, 8, 19)], ids=["first_rows", "chunk_edges"])
@pytest.mark.parametrize("form", GATE_FORMS)
def test_stage_backward_with_resets_matches_finite_differences(form: str, rows: tuple[int, ...]) -> None:
    """A reset's gate gradient is 0 (its difference too: -inf stays -inf); the others go to their segment."""
    x = _stage_inputs(form, T=20)
    _check_stage_backward_against_fd({**x, "g": _with_resets(x["g"], rows, -np.inf)}, 0.5)


@pytest.mark.parametrize("value", RESET_VALUES.values(), ids=RESET_VALUES)
@pytest.mark.parametrize("rows", RESET_ROWS.values(), ids=RESET_ROWS)
def test_chunk_with_resets_equals_recurrent(rows: tuple[int, ...], value: float) -> None:
    """The chunked op with resets (every head at `rows`, head 1 alone at token 25) equals the recurrence, where the
    decay exp(g) is 0: forward to 1e-12 and every gradient to 1e-10, the reset gates' gradient 0."""
    inputs = _float64(gated_delta_rule_inputs(1, 40, 1, 4, 3, HV=2, seed=14))
    inputs["g"][0, list(rows)] = value
    inputs["g"][0, 25, 1] = value
    check_chunk_equals_recurrent(inputs, 16)
    kw, do, dht = _op_args(inputs, (), {})
    grads = naive_chunk.chunk_backward(make_problem("chunk", **kw, chunk_size=16), 16, do, dht)
    assert np.all(grads["g"][np.exp(inputs["g"]) == 0] == 0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("name", ["g", "beta"])
@pytest.mark.parametrize("t", [16, 20, 31], ids=["first_row", "inside", "last_row"])
def test_stages_keep_non_finite_values_causal(t: int, name: str, value: float) -> None:
    """A NaN or an infinity at token t: every stage's rows before t, and with do zero from t on the gradients of the
    tokens before t and of h0, equal those of the sequence cut at t (the masked products select, and a zero
    cotangent times a NaN is 0)."""
    inputs = _float64(gated_delta_rule_inputs(1, 40, 1, 4, 3, HV=2, seed=15))
    kw, do, _ = _op_args(inputs, (), {})
    cut = {n: (a[:, :t] if isinstance(a, np.ndarray) and a.ndim >= 3 and n != "initial_state" else a)
           for n, a in kw.items()}
    kw[name] = kw[name].copy()
    kw[name][0, t] = value
    do[:, t:] = 0.0
    with np.errstate(all="ignore"):
        p = make_problem("chunk", **kw, chunk_size=16)
        o, _ = naive_chunk.chunk_forward(p, 16)
        grads = naive_chunk.chunk_backward(p, 16, do, None)
    p_cut = make_problem("chunk", **cut, chunk_size=16)
    o_cut, _ = naive_chunk.chunk_forward(p_cut, 16)
    ref = naive_chunk.chunk_backward(p_cut, 16, do[:, :t], None)
    _assert_max_rel("o", o_cut, o[:, :t], OUT_RTOL)
    for n, r in ref.items():
        if r is not None:
            _assert_max_rel(f"d{n}", r, grads[n] if n == "initial_state" else grads[n][:, :t], GRAD_RTOL)


# 4. Public references.


def _public_case() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    shape = {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 4, "V": 3, "seqlens": (20, 0, 13), **_ALL_CHUNK_OPTIONS}
    kw, do, dht = _op_args(_float64(make_inputs(shape, seed=41)), (), {"allow_neg_eigval": True})
    return kw, do, dht


def _rest(kw: dict[str, Any]) -> dict[str, Any]:
    return {n: a for n, a in kw.items() if n not in ("q", "k", "v", "g", "beta")}


def test_public_signatures_follow_the_peer_g_before_beta() -> None:
    head = ["q", "k", "v", "g", "beta", "chunk_size", "scale", "initial_state"]
    fwd = inspect.signature(rawdelta.naive_chunk_gated_delta_rule).parameters
    bwd = inspect.signature(rawdelta.naive_chunk_gated_delta_rule_bwd).parameters
    assert list(fwd)[:9] == [*head, "output_final_state"]
    assert list(bwd)[:8] == head
    assert fwd["chunk_size"].default == bwd["chunk_size"].default == 64
    for name in ("naive_chunk_gated_delta_rule", "naive_chunk_gated_delta_rule_bwd"):
        assert name in rawdelta.__all__ and name in rawdelta.ops.gated_delta_rule.__all__


@pytest.mark.parametrize("chunk_size", [16, None], ids=["chunk16", "default64"])
def test_public_reference_equals_chunk_forward_and_backward(chunk_size: int | None) -> None:
    kw, do, dht = _public_case()
    size = {} if chunk_size is None else {"chunk_size": chunk_size}
    C = chunk_size or 64
    p = make_problem("chunk", **kw)
    o_ref, ht_ref = naive_chunk.chunk_forward(p, C)
    o, ht = rawdelta.naive_chunk_gated_delta_rule(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], **size,
                                                  output_final_state=True, **_rest(kw))
    np.testing.assert_array_equal(o, o_ref)
    np.testing.assert_array_equal(ht, ht_ref)
    o2, none = rawdelta.naive_chunk_gated_delta_rule(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], **size,
                                                     **_rest(kw))
    assert none is None
    np.testing.assert_array_equal(o2, o_ref)

    grads = rawdelta.naive_chunk_gated_delta_rule_bwd(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], **size,
                                                      do=do, dht=dht, **_rest(kw))
    assert isinstance(grads, rawdelta.GatedDeltaRuleGrads)
    ref = naive_chunk.chunk_backward(p, C, do, dht)
    for name in rawdelta.GatedDeltaRuleGrads._fields:
        np.testing.assert_array_equal(getattr(grads, name), ref[name], err_msg=name)
    assert grads.gk is None and grads.gv is None


def test_public_reference_validation() -> None:
    kw, do, _ = _public_case()
    q, k, v, g, beta, rest = kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], _rest(kw)
    for bad in (48, 0, True, None):
        with pytest.raises(ValueError, match="chunk_size must be one of"):
            rawdelta.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=bad, **rest)
        with pytest.raises(ValueError, match="chunk_size must be one of"):
            rawdelta.naive_chunk_gated_delta_rule(q, k, v, g, beta, bad, **rest)
        with pytest.raises(ValueError, match="chunk_size must be one of"):
            rawdelta.naive_chunk_gated_delta_rule_bwd(q, k, v, g, beta, bad, do=do, **rest)
    gk = np.zeros(q.shape[:2] + (v.shape[2], q.shape[3]))
    with pytest.raises(TypeError, match="gk"):
        rawdelta.naive_chunk_gated_delta_rule(q, k, v, g, beta, gk=gk, **rest)
    with pytest.raises(NotImplementedError, match="per value dimension"):
        rawdelta.naive_chunk_gated_delta_rule(q, k, v, g, np.zeros(v.shape), **rest)
    with pytest.raises(ValueError, match=r"do must have shape \[B, T, HV, V\] = \[1, 33, 2, 3\]"):
        rawdelta.naive_chunk_gated_delta_rule_bwd(q, k, v, g, beta, do=do[:, :4], **rest)
    with pytest.raises(TypeError, match="do must be an array"):
        rawdelta.naive_chunk_gated_delta_rule_bwd(q, k, v, g, beta, do=do.tolist(), **rest)
