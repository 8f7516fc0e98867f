"""The ``numba`` backend of the recurrent gated delta rule against the float64 NumPy reference.

Every option of README.md, forward (o, final state) and every gradient (dh0 and the dht path included).
``numba_sim`` tests use tiny shapes (the CUDA simulator runs each thread in Python); ``gpu`` tests run
the same kernels on a real GPU with CuPy device arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.gated_delta_rule import naive
from rawdelta.ops.gated_delta_rule.problem import make_problem
from rawdelta.ops.gated_delta_rule.recurrent import (
    GatedDeltaRuleGrads,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)
from rawdelta.testing import assert_close, gated_delta_rule_inputs, to_device, to_host
from rawdelta.testing.inputs import split_op_args


def _grad_label(name: str) -> str:
    return "dh0" if name == "initial_state" else "d" + name


def _tol_dtype(dtype: Any) -> str:
    # The numba backend computes in float32 whatever the input dtype, so float64 inputs get float32 bounds.
    name = np.dtype(dtype).name
    return "float32" if name == "float64" else name


def _check(inputs: dict[str, Any], *, use_dht: bool = True, device: bool = False,
           drop: tuple[str, ...] = (), **extra: Any) -> None:
    """Run the numba backend on `inputs` (host or CuPy) and compare o, ht and every gradient with naive.py."""
    kw, do, dht = split_op_args(inputs)
    for name in drop:
        kw.pop(name)
    kw.update(extra)
    if not use_dht:
        dht = None
    dtype = _tol_dtype(kw["q"].dtype)

    p = make_problem(**kw, output_final_state=True, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)
    grads_ref = naive.recurrent_backward(p, do, dht)

    host_copies = {n: x.copy() for n, x in kw.items() if isinstance(x, np.ndarray)}
    if device:
        import cupy

        kw = to_device(kw)
        do = cupy.asarray(do)
        dht = None if dht is None else cupy.asarray(dht)
    (o, ht), res = fused_recurrent_gated_delta_rule_fwd(**kw, output_final_state=True, backend="numba")
    grads = fused_recurrent_gated_delta_rule_bwd(res, do, dht)

    assert type(o) is type(kw["q"]) and type(ht) is type(kw["q"])
    assert o.shape == (p.B, p.T, p.HV, p.V) and o.dtype == kw["v"].dtype
    assert ht.shape == (p.N, p.HV, p.K, p.V)
    assert_close("o", o_ref, o, dtype=dtype)
    assert_close("ht", ht_ref, ht, dtype=dtype)
    for name in GatedDeltaRuleGrads._fields:
        got = getattr(grads, name)
        if kw.get(name) is None:
            assert got is None, f"gradient of absent input {name}"
            continue
        assert got is not None, f"missing gradient of {name}"
        assert type(got) is type(kw["q"]) and got.shape == kw[name].shape, name
        assert_close(_grad_label(name), grads_ref[name], got, dtype=dtype)
    for n, x in host_copies.items():  # inputs are never modified
        np.testing.assert_array_equal(to_host(kw[n]), x, err_msg=n)


# (name, generator options, op keyword arguments added, inputs dropped)
_OPTIONS = [
    ("no_gates", {"g": False}, {}, ()),
    ("g", {}, {}, ()),
    ("gk", {"g": False, "gk": True}, {}, ()),
    ("gv", {"g": False, "gv": True}, {}, ()),
    ("g_gk_gv", {"gk": True, "gv": True}, {}, ()),
    ("beta_per_v", {"beta_per_v": True, "gv": True}, {}, ()),
    ("beta_none", {"beta": False}, {}, ()),
    ("l2norm", {"use_qk_l2norm_in_kernel": True}, {}, ()),
    ("beta_sigmoid", {"use_beta_sigmoid_in_kernel": True}, {}, ()),
    ("beta_sigmoid_neg_eigval", {"use_beta_sigmoid_in_kernel": True}, {"allow_neg_eigval": True}, ()),
    ("beta_sigmoid_per_v", {"use_beta_sigmoid_in_kernel": True, "beta_per_v": True}, {"allow_neg_eigval": True},
     ()),
    ("gate_in_kernel", {"use_gate_in_kernel": True}, {}, ()),
    ("gate_in_kernel_no_dt_bias", {"use_gate_in_kernel": True}, {}, ("dt_bias",)),
    ("gate_in_kernel_gk_gv", {"use_gate_in_kernel": True, "gk": True, "gv": True}, {}, ()),
    ("everything", {"use_qk_l2norm_in_kernel": True, "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True,
                    "gk": True, "gv": True, "beta_per_v": True}, {"allow_neg_eigval": True}, ()),
]


@pytest.mark.numba_sim
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in _OPTIONS], ids=[o[0] for o in _OPTIONS])
def test_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...]) -> None:
    _check(gated_delta_rule_inputs(2, 5, 2, 4, 6, seed=1, **gen), drop=drop, **extra)


_SHAPES = [
    ("grouped_2x", {"B": 2, "T": 4, "H": 1, "HV": 2, "K": 4, "V": 3}),
    ("grouped_3x", {"B": 1, "T": 5, "H": 2, "HV": 6, "K": 3, "V": 4, "gk": True}),
    ("T1", {"B": 2, "T": 1, "H": 2, "K": 4, "V": 4}),
    ("K_gt_V", {"B": 1, "T": 6, "H": 1, "K": 8, "V": 3}),
    ("K_lt_V", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 8, "gv": True}),
    ("no_h0", {"B": 2, "T": 5, "H": 1, "K": 4, "V": 4, "initial_state": False}),
    ("varlen_empty", {"B": 1, "T": 0, "H": 2, "K": 4, "V": 3, "seqlens": (3, 0, 4, 1)}),
    ("varlen_empty_ends", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 4, "V": 3, "seqlens": (0, 5, 0), "gk": True,
                           "gv": True, "beta_per_v": True}),
    ("varlen_no_h0", {"B": 1, "T": 0, "H": 1, "K": 4, "V": 3, "seqlens": (2, 1, 0, 3), "initial_state": False}),
]


@pytest.mark.numba_sim
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in _SHAPES], ids=[s[0] for s in _SHAPES])
def test_shapes(shape: dict[str, Any], use_dht: bool) -> None:
    s = dict(shape)
    _check(gated_delta_rule_inputs(s.pop("B"), s.pop("T"), s.pop("H"), s.pop("K"), s.pop("V"), seed=2, **s),
           use_dht=use_dht)


@pytest.mark.numba_sim
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_input_dtypes(dtype: str) -> None:
    _check(gated_delta_rule_inputs(1, 6, 1, 4, 5, HV=2, dtype=dtype, seed=3, gk=True,
                                   use_qk_l2norm_in_kernel=True))


@pytest.mark.numba_sim
def test_non_float32_gates_and_state() -> None:
    """Gates, beta and h0 given in float64 are read as float32 (make_problem casts them for this backend)."""
    inputs = gated_delta_rule_inputs(1, 4, 1, 4, 3, seed=4, gk=True)
    for n in ("g", "gk", "beta", "initial_state"):
        inputs[n] = inputs[n].astype(np.float64)
    _check(inputs)


@pytest.mark.numba_sim
def test_forward_only_and_inplace_final_state() -> None:
    kw, _, _ = split_op_args(gated_delta_rule_inputs(1, 0, 1, 4, 3, seed=5, seqlens=(2, 0, 3), gv=True))
    p = make_problem(**kw, output_final_state=True, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)

    o, ht = fused_recurrent_gated_delta_rule(**kw, backend="numba")
    assert ht is None
    assert_close("o", o_ref, o, dtype="float32")

    h0 = kw["initial_state"].copy()
    o, ht = fused_recurrent_gated_delta_rule(**{**kw, "initial_state": h0}, inplace_final_state=True, backend="numba")
    assert ht is h0
    assert_close("o", o_ref, o, dtype="float32")
    assert_close("ht", ht_ref, h0, dtype="float32")


_GPU_CASES = [
    ("dense", {"B": 2, "T": 33, "H": 2, "HV": 4, "K": 32, "V": 48}, {}),
    ("varlen_all_options", {"B": 1, "T": 0, "H": 2, "HV": 4, "K": 32, "V": 48, "seqlens": (17, 0, 30, 1),
                            "gk": True, "gv": True, "beta_per_v": True, "use_qk_l2norm_in_kernel": True,
                            "use_beta_sigmoid_in_kernel": True}, {"allow_neg_eigval": True}),
    ("gate_in_kernel", {"B": 2, "T": 33, "H": 1, "HV": 2, "K": 64, "V": 16, "use_gate_in_kernel": True,
                        "initial_state": False}, {}),
    ("K256", {"B": 1, "T": 9, "H": 1, "HV": 2, "K": 256, "V": 16, "gk": True, "use_qk_l2norm_in_kernel": True}, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("shape", "extra"), [c[1:] for c in _GPU_CASES], ids=[c[0] for c in _GPU_CASES])
def test_gpu_cupy(shape: dict[str, Any], extra: dict[str, Any], dtype: str) -> None:
    s = dict(shape)
    inputs = gated_delta_rule_inputs(s.pop("B"), s.pop("T"), s.pop("H"), s.pop("K"), s.pop("V"), dtype=dtype,
                                     seed=6, **s)
    _check(inputs, device=True, **extra)


@pytest.mark.gpu
def test_gpu_cupy_on_a_stream() -> None:
    """Launches follow CuPy's current stream: results are ordered with the CuPy work around them."""
    import cupy

    with cupy.cuda.Stream(non_blocking=True):
        _check(gated_delta_rule_inputs(2, 33, 2, 32, 48, HV=4, seed=7, gk=True), device=True, use_dht=False)
