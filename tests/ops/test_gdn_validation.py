"""Argument validation of the recurrent gated delta rule (api.md section 6), on the host.

Every bad call raises the documented exception class before any computation, with a message naming
the argument and, for shapes, the expected ``[B, T, H, K] = [..]`` form with the bound values.
Also: inputs are never modified in place, and non-contiguous inputs give the contiguous result.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.errors import UnsupportedConfigError
from rawdelta.ops.gated_delta_rule import naive
from rawdelta.ops.gated_delta_rule.problem import make_problem
from rawdelta.ops.gated_delta_rule.recurrent import FusedRecurrentGatedDeltaRuleResiduals
from rawdelta.testing import gated_delta_rule_inputs

# B=1, T=5, H=1, HV=2, K=3, V=4.
B, T, H, HV, K, V = 1, 5, 1, 2, 3, 4


def good_inputs(**kw: Any) -> dict[str, Any]:
    inp = gated_delta_rule_inputs(B, T, H, K, V, HV=HV, seed=1, **kw)
    inp.pop("do")
    inp.pop("dht")
    return inp


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if the numpy backend is entered: validation must happen before any computation."""
    calls: list[str] = []

    def forward(p: Any) -> Any:
        calls.append("forward")
        raise AssertionError("recurrent_forward ran on an invalid call")

    def backward(p: Any, do: Any, dht: Any = None) -> Any:
        calls.append("backward")
        raise AssertionError("recurrent_backward ran on an invalid call")

    monkeypatch.setattr(naive, "recurrent_forward", forward)
    monkeypatch.setattr(naive, "recurrent_backward", backward)
    return calls


def call(**over: Any) -> Any:
    kw = good_inputs()
    kw.update(over)
    kw = {n: a for n, a in kw.items() if not (a is None and n in ("g", "beta", "initial_state"))}
    return rawdelta.fused_recurrent_gated_delta_rule(**kw)


def raises(exc: type[BaseException], *patterns: str, **over: Any) -> str:
    with pytest.raises(exc) as info:
        call(**over)
    assert type(info.value) is exc or issubclass(type(info.value), exc)
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in message: {msg}"
    return msg


def test_good_call_runs() -> None:
    o, ht = call(output_final_state=True)
    assert o.shape == (B, T, HV, V) and ht.shape == (B, HV, K, V)


# TypeError: not an array.


@pytest.mark.parametrize("name", ["q", "k", "v", "g", "beta", "initial_state", "gk", "gv"])
@pytest.mark.parametrize("bad", [pytest.param([[0.0]], id="list"), pytest.param(1.5, id="float"),
                                 pytest.param("x", id="str")])
def test_not_an_array(no_compute: list[str], name: str, bad: Any) -> None:
    raises(TypeError, rf"\b{name} must be an array", **{name: bad})
    assert no_compute == []


def test_not_an_array_a_log_dt_bias_cu_seqlens(no_compute: list[str]) -> None:
    raises(TypeError, r"A_log must be an array", use_gate_in_kernel=True, A_log=[1.0, 2.0])
    raises(TypeError, r"dt_bias must be an array", use_gate_in_kernel=True, A_log=np.zeros(HV, np.float32),
           dt_bias=(0.0, 0.0))
    raises(TypeError, r"cu_seqlens must be an array", cu_seqlens=[0, T])
    assert no_compute == []


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_required_input_none_is_type_error(name: str) -> None:
    kw = good_inputs()
    kw[name] = None
    with pytest.raises(TypeError, match=name):
        rawdelta.fused_recurrent_gated_delta_rule(**kw)


@pytest.mark.gpu
def test_mixed_host_device() -> None:
    import cupy

    kw = good_inputs()
    kw["k"] = cupy.asarray(kw["k"])
    with pytest.raises(TypeError, match="all host or all device"):
        rawdelta.fused_recurrent_gated_delta_rule(**kw)


# ValueError: shapes, naming the argument and the expected shape with bound values.

SHAPE_CASES = [
    # (argument, bad array, regex of the expected-shape phrase)
    ("k", np.zeros((B, T, H), np.float32), r"k must be 4-D \[B, T, H, K\] = \[1, 5, 1, 3\], got shape \(1, 5, 1\)"),
    ("k", np.zeros((B, T + 1, H, K), np.float32),
     r"k must have shape \[B, T, H, K\] = \[1, 5, 1, 3\], got \(1, 6, 1, 3\)"),
    ("k", np.zeros((B, T, H, K + 1), np.float32), r"k must have shape \[B, T, H, K\] = \[1, 5, 1, 3\].*mismatch in K"),
    ("v", np.zeros((B, T, HV, V, 1), np.float32),
     r"v must be 4-D \[B, T, HV, V\] = \[1, 5, HV, V\], got shape \(1, 5, 2, 4, 1\)"),
    # v binds HV and V itself; B and T are already bound by q and shown.
    ("v", np.zeros((2, T, HV, V), np.float32),
     r"v must have shape \[B, T, HV, V\] = \[1, 5, HV, V\], got \(2, 5, 2, 4\) \(mismatch in B\)"),
    ("g", np.zeros((B, T), np.float32), r"g must be 3-D \[B, T, HV\] = \[1, 5, 2\], got shape \(1, 5\)"),
    ("g", np.zeros((B, T, HV + 1), np.float32), r"g must have shape \[B, T, HV\] = \[1, 5, 2\], got \(1, 5, 3\)"),
    ("gk", np.zeros((B, T, HV), np.float32), r"gk must be 4-D \[B, T, HV, K\] = \[1, 5, 2, 3\]"),
    ("gk", np.zeros((B, T, HV, V), np.float32), r"gk must have shape \[B, T, HV, K\] = \[1, 5, 2, 3\].*mismatch in K"),
    ("gv", np.zeros((B, T, HV, K), np.float32), r"gv must have shape \[B, T, HV, V\] = \[1, 5, 2, 4\].*mismatch in V"),
    ("gv", np.zeros((B, T, HV, V, 1), np.float32), r"gv must be 4-D \[B, T, HV, V\] = \[1, 5, 2, 4\]"),
    ("beta", np.zeros((B, T), np.float32), r"beta must be 3-D \[B, T, HV\] = \[1, 5, 2\]"),
    ("beta", np.zeros((B, T, H), np.float32), r"beta must have shape \[B, T, HV\] = \[1, 5, 2\].*mismatch in HV"),
    ("beta", np.zeros((B, T, HV, V + 1), np.float32),
     r"beta must have shape \[B, T, HV, V\] = \[1, 5, 2, 4\].*mismatch in V"),
    ("initial_state", np.zeros((B, HV, K), np.float32), r"initial_state must be 4-D \[N, HV, K, V\] = \[1, 2, 3, 4\]"),
    ("initial_state", np.zeros((B, HV, V, K), np.float32),
     r"initial_state must have shape \[N, HV, K, V\] = \[1, 2, 3, 4\], got \(1, 2, 4, 3\)"),
]


@pytest.mark.parametrize("name,bad,pattern", [pytest.param(n, b, p, id=f"{n}-{'x'.join(map(str, b.shape))}")
                                              for n, b, p in SHAPE_CASES])
def test_bad_shape(no_compute: list[str], name: str, bad: np.ndarray, pattern: str) -> None:
    raises(ValueError, pattern, **{name: bad})
    assert no_compute == []


def test_bad_q_shape_names_q(no_compute: list[str]) -> None:
    # q is checked first, so nothing is bound yet: the message shows the symbolic form only.
    raises(ValueError, r"q must be 4-D \[B, T, H, K\], got shape \(5, 1, 3\)", q=np.zeros((T, H, K), np.float32))
    assert no_compute == []


@pytest.mark.parametrize("name", ["A_log", "dt_bias"])
def test_bad_a_log_dt_bias_shape(no_compute: list[str], name: str) -> None:
    gate = {"use_gate_in_kernel": True, "A_log": np.zeros(HV, np.float32), "dt_bias": np.zeros(HV, np.float32)}
    gate[name] = np.zeros(HV + 1, np.float32)
    raises(ValueError, rf"{name} must have shape \[HV\] = \[2\], got \(3,\)", **gate)
    gate[name] = np.zeros((HV, 1), np.float32)
    raises(ValueError, rf"{name} must be 1-D \[HV\] = \[2\], got shape \(2, 1\)", **gate)
    assert no_compute == []


def test_hv_not_multiple_of_h(no_compute: list[str]) -> None:
    q = np.zeros((B, T, 3, K), np.float32)
    raises(ValueError, r"HV=2 must be a multiple of the key heads H=3", q=q, k=q.copy())
    assert no_compute == []


def test_initial_state_rows_must_be_n(no_compute: list[str]) -> None:
    raises(ValueError, r"initial_state must have shape \[N, HV, K, V\] = \[1, 2, 3, 4\].*mismatch in N",
           initial_state=np.zeros((2, HV, K, V), np.float32))
    # With cu_seqlens, N is the number of sequences.
    raises(ValueError, r"initial_state must have shape \[N, HV, K, V\] = \[3, 2, 3, 4\].*mismatch in N",
           cu_seqlens=np.array([0, 2, 2, T]), initial_state=np.zeros((1, HV, K, V), np.float32))
    assert no_compute == []


# ValueError: dtypes.


def test_qkv_dtype_mismatch(no_compute: list[str]) -> None:
    kw = good_inputs()
    raises(ValueError, r"q, k and v must share one dtype.*'v': 'float16'", v=kw["v"].astype(np.float16))
    assert no_compute == []


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_dtype(no_compute: list[str], dtype: Any) -> None:
    kw = good_inputs()
    msg = raises(ValueError, r"q must have a floating dtype", r"k must have a floating dtype",
                 r"v must have a floating dtype",
                 **{n: kw[n].astype(dtype) for n in ("q", "k", "v")})
    assert np.dtype(dtype).name in msg
    raises(ValueError, r"g must have a floating dtype.*int32", g=kw["g"].astype(np.int32))
    raises(ValueError, r"beta must have a floating dtype.*int64", beta=kw["beta"].astype(np.int64))
    raises(ValueError, r"initial_state must have a floating dtype.*int32",
           initial_state=kw["initial_state"].astype(np.int32))
    assert no_compute == []


# ValueError: cu_seqlens.


@pytest.mark.parametrize("cu,pattern", [
    pytest.param(np.array([[0, T]]), r"cu_seqlens must be a 1-D vector \[N \+ 1\], got shape \(1, 2\)", id="2d"),
    pytest.param(np.array([], np.int64), r"cu_seqlens must be a 1-D vector \[N \+ 1\], got shape \(0,\)", id="empty"),
    pytest.param(np.array([1, T]), r"cu_seqlens must start at 0, got 1", id="start"),
    pytest.param(np.array([0, 3, 2, T]), r"cu_seqlens must be non-decreasing", id="decreasing"),
    pytest.param(np.array([0, 2, T - 1]), r"cu_seqlens must end at T=5, got 4", id="end-short"),
    pytest.param(np.array([0, 2, T + 1]), r"cu_seqlens must end at T=5, got 6", id="end-long"),
    pytest.param(np.array([0.0, 5.0]), r"cu_seqlens must be int32 or int64, got float64", id="float"),
])
def test_bad_cu_seqlens(no_compute: list[str], cu: np.ndarray, pattern: str) -> None:
    raises(ValueError, pattern, cu_seqlens=cu, initial_state=None)
    assert no_compute == []


def test_cu_seqlens_requires_b1(no_compute: list[str]) -> None:
    inp = gated_delta_rule_inputs(2, T, H, K, V, HV=HV, initial_state=False)
    kw = {n: inp[n] for n in ("q", "k", "v", "g", "beta")}
    with pytest.raises(ValueError, match=r"cu_seqlens requires B == 1.*got B=2"):
        rawdelta.fused_recurrent_gated_delta_rule(**kw, cu_seqlens=np.array([0, T]))
    assert no_compute == []


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_good_cu_seqlens_int_dtypes(dtype: Any) -> None:
    o, ht = call(cu_seqlens=np.array([0, 2, 2, T], dtype=dtype), initial_state=np.zeros((3, HV, K, V), np.float32),
                 output_final_state=True)
    assert ht.shape == (3, HV, K, V)


# ValueError: scalar options and combinations.


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, -1e-30, float("nan")])
def test_bad_scale(no_compute: list[str], scale: float) -> None:
    raises(ValueError, r"scale must be > 0", scale=scale)
    assert no_compute == []


def test_option_combinations(no_compute: list[str]) -> None:
    raises(ValueError, r"allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True", allow_neg_eigval=True)
    raises(ValueError, r"use_gate_in_kernel=True needs A_log \[HV\]", use_gate_in_kernel=True)
    raises(ValueError, r"use_gate_in_kernel=True needs the raw gate g", use_gate_in_kernel=True,
           A_log=np.zeros(HV, np.float32), g=None)
    raises(ValueError, r"A_log / dt_bias are only used with use_gate_in_kernel=True", A_log=np.zeros(HV, np.float32))
    raises(ValueError, r"A_log / dt_bias are only used with use_gate_in_kernel=True", dt_bias=np.zeros(HV, np.float32))
    raises(ValueError, r"inplace_final_state=True needs initial_state", inplace_final_state=True, initial_state=None)
    raises(ValueError, r"inplace_final_state=True needs a C-contiguous float32 initial_state", inplace_final_state=True,
           initial_state=np.zeros((B, HV, K, V), np.float16))
    assert no_compute == []


def test_bad_backend(no_compute: list[str]) -> None:
    raises(ValueError, r"backend must be one of \('auto', 'cuda', 'numba', 'numpy'\), got 'torch'", backend="torch")
    raises(ValueError, r"backend='cuda' needs device arrays.*got host arrays", backend="cuda")
    assert no_compute == []


def test_many_errors_reported_together(no_compute: list[str]) -> None:
    kw = good_inputs()
    msg = raises(
        ValueError,
        r"g must have shape \[B, T, HV\] = \[1, 5, 2\]",
        r"beta must be 3-D \[B, T, HV\] = \[1, 5, 2\]",
        r"initial_state must have shape \[N, HV, K, V\] = \[1, 2, 3, 4\]",
        r"allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True",
        r"scale must be > 0",
        r"backend must be one of",
        g=kw["g"][:, :2], beta=kw["beta"][0], initial_state=np.zeros((1, HV, K, K), np.float32),
        allow_neg_eigval=True, scale=-2.0, backend="tpu",
    )
    assert msg.count(";") >= 5
    assert no_compute == []


def test_naive_reference_validates_too() -> None:
    kw = good_inputs()
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\] = \[1, 5, 2\].*scale must be > 0"):
        rawdelta.naive_recurrent_gated_delta_rule(kw["q"], kw["k"], kw["v"], kw["beta"], kw["g"][:, 1:], scale=0)
    with pytest.raises(TypeError, match=r"q must be an array"):
        rawdelta.naive_recurrent_gated_delta_rule_bwd([0.0], kw["k"], kw["v"], do=np.zeros((B, T, HV, V)))


# Backward cotangents.


def test_backward_cotangent_checks(no_compute: list[str]) -> None:
    # Residuals built directly: the forward itself is patched out by no_compute.
    res = FusedRecurrentGatedDeltaRuleResiduals(make_problem(**good_inputs(), backend="numpy"))
    do = np.zeros((B, T, HV, V), np.float32)
    with pytest.raises(ValueError, match=r"do must have shape \[B, T, HV, V\] = \[1, 5, 2, 4\], got \(1, 5, 2, 3\)"):
        rawdelta.fused_recurrent_gated_delta_rule_bwd(res, do[..., :3])
    with pytest.raises(ValueError, match=r"dht must be 4-D \[N, HV, K, V\] = \[1, 2, 3, 4\]"):
        rawdelta.fused_recurrent_gated_delta_rule_bwd(res, do, np.zeros((HV, K, V), np.float32))
    with pytest.raises(TypeError, match=r"do must be an array"):
        rawdelta.fused_recurrent_gated_delta_rule_bwd(res, do.tolist())
    assert no_compute == []


def test_backward_after_inplace_final_state_refuses() -> None:
    kw = good_inputs()
    (_, ht), res = rawdelta.fused_recurrent_gated_delta_rule_fwd(**kw, inplace_final_state=True, backend="numpy")
    assert ht is kw["initial_state"]
    with pytest.raises(ValueError, match="inplace_final_state"):
        rawdelta.fused_recurrent_gated_delta_rule_bwd(res, np.zeros((B, T, HV, V), np.float32))


# No input modified; non-contiguous inputs.


ALL_OPTIONS = {"gk": True, "gv": True, "beta_per_v": True, "use_qk_l2norm_in_kernel": True,
               "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inputs_not_modified(dtype: str) -> None:
    inp = gated_delta_rule_inputs(1, 7, 1, K, V, HV=HV, dtype=dtype, seqlens=[3, 0, 4], **ALL_OPTIONS)
    do, dht = inp.pop("do"), inp.pop("dht")
    before = {n: a.copy() for n, a in inp.items() if isinstance(a, np.ndarray)}
    do0, dht0 = do.copy(), dht.copy()
    (_, _), res = rawdelta.fused_recurrent_gated_delta_rule_fwd(**inp, output_final_state=True, allow_neg_eigval=True)
    rawdelta.fused_recurrent_gated_delta_rule_bwd(res, do, dht)
    kw_naive = {n: a for n, a in inp.items() if n not in ("q", "k", "v", "beta", "g")}
    rawdelta.naive_recurrent_gated_delta_rule_bwd(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"], do=do, dht=dht,
                                                  allow_neg_eigval=True, **kw_naive)
    for n, a in before.items():
        assert inp[n].dtype == a.dtype
        np.testing.assert_array_equal(inp[n], a, err_msg=f"{n} was modified")
    np.testing.assert_array_equal(do, do0)
    np.testing.assert_array_equal(dht, dht0)


def _non_contiguous(a: np.ndarray) -> np.ndarray:
    """The same values as a non-contiguous view: transposed storage of the last two axes where that is
    non-contiguous, else every other element of a buffer twice as wide."""
    out = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2) if a.ndim >= 2 else a
    if out.flags.c_contiguous:
        buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        buf[..., ::2] = a
        out = buf[..., ::2]
    assert not out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)
    return out


def test_non_contiguous_inputs_match_contiguous() -> None:
    inp = gated_delta_rule_inputs(1, 7, 1, K, V, HV=HV, seqlens=[3, 0, 4], **ALL_OPTIONS)
    do, dht = inp.pop("do"), inp.pop("dht")
    nc = {n: (_non_contiguous(a) if isinstance(a, np.ndarray) and n != "cu_seqlens" else a) for n, a in inp.items()}
    opts = {"output_final_state": True, "allow_neg_eigval": True, "backend": "numpy"}
    (o, ht), res = rawdelta.fused_recurrent_gated_delta_rule_fwd(**inp, **opts)
    (o_nc, ht_nc), res_nc = rawdelta.fused_recurrent_gated_delta_rule_fwd(**nc, **opts)
    np.testing.assert_array_equal(o_nc, o)
    np.testing.assert_array_equal(ht_nc, ht)
    g = rawdelta.fused_recurrent_gated_delta_rule_bwd(res, do, dht)
    g_nc = rawdelta.fused_recurrent_gated_delta_rule_bwd(res_nc, _non_contiguous(do), _non_contiguous(dht))
    for name in rawdelta.GatedDeltaRuleGrads._fields:
        a, b = getattr(g, name), getattr(g_nc, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(b, a, err_msg=name)


def test_unsupported_config_error_is_not_implemented() -> None:
    # api.md: a valid combination a backend does not support raises NotImplementedError (a subclass here).
    assert issubclass(UnsupportedConfigError, NotImplementedError)
