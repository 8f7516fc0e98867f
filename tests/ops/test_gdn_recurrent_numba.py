"""The ``numba`` backend of the recurrent gated delta rule against the float64 NumPy reference.

Every option of README.md, forward (o, final state) and every gradient (dh0 and the dht path included).
``numba_sim`` tests use tiny shapes (the CUDA simulator runs each thread in Python); ``gpu`` tests run
the same kernels on a real GPU with CuPy device arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.gated_delta_rule import fused_recurrent_gated_delta_rule, naive
from rawdelta.testing import assert_close, gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import OPTIONS, SHAPES, check_backend, make_inputs, make_problem


@pytest.mark.numba_sim
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in OPTIONS], ids=[o[0] for o in OPTIONS])
def test_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...]) -> None:
    check_backend("numba", gated_delta_rule_inputs(2, 5, 2, 4, 6, seed=1, **gen), drop=drop, **extra)


@pytest.mark.numba_sim
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_shapes(shape: dict[str, Any], use_dht: bool) -> None:
    check_backend("numba", make_inputs(shape, seed=2), use_dht=use_dht)


@pytest.mark.numba_sim
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_input_dtypes(dtype: str) -> None:
    check_backend(
        "numba",
        gated_delta_rule_inputs(1, 6, 1, 4, 5, HV=2, dtype=dtype, seed=3, gk=True, use_qk_l2norm_in_kernel=True),
    )


@pytest.mark.numba_sim
def test_non_float32_gates_and_state() -> None:
    """Gates, beta and h0 given in float64 are read as float32 (make_problem casts them for this backend)."""
    inputs = gated_delta_rule_inputs(1, 4, 1, 4, 3, seed=4, gk=True)
    for n in ("g", "gk", "beta", "initial_state"):
        inputs[n] = inputs[n].astype(np.float64)
    check_backend("numba", inputs)


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


@pytest.mark.numba_sim
@pytest.mark.parametrize("value", [-np.inf, -1e30], ids=["-inf", "-1e30"])
def test_resets(value: float) -> None:
    """Gates whose decay is 0: g in one head, gk in some keys, gv in some values (rows and columns of the state
    reset), against the float64 reference, which zeroes exactly those."""
    inputs = gated_delta_rule_inputs(1, 6, 1, 4, 3, HV=2, seed=8, gk=True, gv=True)
    inputs["g"][0, 1, 0] = value
    inputs["gk"][0, 2, 1, :2] = value
    inputs["gv"][0, 4, 0, 1:] = value
    check_backend("numba", inputs)


_GPU_CASES = [
    ("dense", {"B": 2, "T": 33, "H": 2, "HV": 4, "K": 32, "V": 48}, {}),
    (
        "varlen_all_options",
        {
            "B": 1,
            "T": 0,
            "H": 2,
            "HV": 4,
            "K": 32,
            "V": 48,
            "seqlens": (17, 0, 30, 1),
            "gk": True,
            "gv": True,
            "beta_per_v": True,
            "use_qk_l2norm_in_kernel": True,
            "use_beta_sigmoid_in_kernel": True,
        },
        {"allow_neg_eigval": True},
    ),
    (
        "gate_in_kernel",
        {"B": 2, "T": 33, "H": 1, "HV": 2, "K": 64, "V": 16, "use_gate_in_kernel": True, "initial_state": False},
        {},
    ),
    ("K256", {"B": 1, "T": 9, "H": 1, "HV": 2, "K": 256, "V": 16, "gk": True, "use_qk_l2norm_in_kernel": True}, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("shape", "extra"), [c[1:] for c in _GPU_CASES], ids=[c[0] for c in _GPU_CASES])
def test_gpu_cupy(shape: dict[str, Any], extra: dict[str, Any], dtype: str) -> None:
    s = dict(shape)
    inputs = gated_delta_rule_inputs(
        s.pop("B"), s.pop("T"), s.pop("H"), s.pop("K"), s.pop("V"), dtype=dtype, seed=6, **s
    )
    check_backend("numba", inputs, device=True, **extra)


@pytest.mark.gpu
def test_gpu_cupy_on_a_stream() -> None:
    """Launches follow CuPy's current stream: results are ordered with the CuPy work around them."""
    import cupy

    with cupy.cuda.Stream(non_blocking=True):
        check_backend(
            "numba", gated_delta_rule_inputs(2, 33, 2, 32, 48, HV=4, seed=7, gk=True), device=True, use_dht=False
        )
