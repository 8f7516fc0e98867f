"""The ``cuda`` backend of the recurrent gated delta rule against the float64 NumPy reference (GPU only).

Forward (o, final state) and every gradient (dh0 and the dht path included) for every option, every
input dtype, grouped heads, varlen with empty sequences, K up to 256, K and V not multiples of the
tile; plus bitwise determinism of the backward and the in-place decode update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.gated_delta_rule import (
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
    naive,
)
from rawdelta.testing import assert_close, assert_same_bits, gated_delta_rule_inputs, to_device
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import OPTIONS, SHAPES, check_backend, make_inputs, make_problem

pytestmark = pytest.mark.gpu
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in OPTIONS], ids=[o[0] for o in OPTIONS])
def test_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...], dtype: str) -> None:
    check_backend("cuda", gated_delta_rule_inputs(2, 37, 2, 24, 40, dtype=dtype, seed=1, **gen), device=True,
                  drop=drop, **extra)


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_shapes(shape: dict[str, Any], use_dht: bool) -> None:
    check_backend("cuda", make_inputs(shape, seed=2), device=True, use_dht=use_dht)


_LARGER = [
    # many segments of the backward (T > C), several column passes and vb blocks, K/V off the tile
    ("K128_V128_T300", {"B": 2, "T": 300, "H": 2, "HV": 4, "K": 128, "V": 128, "gk": True}),
    ("K100_V200", {"B": 1, "T": 70, "H": 1, "HV": 2, "K": 100, "V": 200, "use_qk_l2norm_in_kernel": True}),
    ("K256", {"B": 1, "T": 40, "H": 1, "HV": 2, "K": 256, "V": 64, "gv": True, "use_qk_l2norm_in_kernel": True}),
    ("K64_varlen", {"B": 1, "T": 0, "H": 2, "HV": 4, "K": 64, "V": 64, "seqlens": (100, 0, 1, 65, 33),
                    "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}),
    ("K16_V8", {"B": 3, "T": 50, "H": 1, "K": 16, "V": 8, "beta_per_v": True, "gk": True, "gv": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [c[1] for c in _LARGER], ids=[c[0] for c in _LARGER])
def test_larger_shapes(shape: dict[str, Any], dtype: str) -> None:
    check_backend("cuda", make_inputs(shape, seed=3, dtype=dtype), device=True)


def test_backward_is_bitwise_deterministic() -> None:
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 130, 2, 64, 96, HV=4, dtype="bfloat16", seed=4, gk=True,
                                                        gv=True, use_gate_in_kernel=True))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    runs = []
    for _ in range(3):
        (_, _), res = fused_recurrent_gated_delta_rule_fwd(**kw, output_final_state=True, backend="cuda")
        runs.append(fused_recurrent_gated_delta_rule_bwd(res, do, dht))
    for other in runs[1:]:
        assert_same_bits(runs[0], other)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_decode_step(dtype: str) -> None:
    """One token per sequence, state updated in place: equals the reference and returns the same buffer."""
    import cupy

    kw, _, _ = split_op_args(gated_delta_rule_inputs(16, 1, 4, 128, 128, HV=8, dtype=dtype, seed=5,
                                                     use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                                     use_beta_sigmoid_in_kernel=True))
    p = make_problem(**kw, output_final_state=True, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)
    dev = to_device(kw)
    state = dev["initial_state"]
    ptr = state.data.ptr
    o, ht = fused_recurrent_gated_delta_rule(**dev, inplace_final_state=True, backend="cuda")
    assert ht is state and ht.data.ptr == ptr
    assert_close("o", o_ref, o, dtype=dtype)
    assert_close("ht", ht_ref, ht, dtype=dtype)
    # the next step reads the updated state
    o2, _ = fused_recurrent_gated_delta_rule(**dev, inplace_final_state=True, backend="cuda")
    p2 = make_problem(**{**kw, "initial_state": ht_ref.astype(np.float32)}, output_final_state=True, backend="numpy")
    o2_ref, ht2_ref = naive.recurrent_forward(p2)
    assert_close("o", o2_ref, o2, dtype=dtype)
    assert_close("ht", ht2_ref, state, dtype=dtype)
    assert isinstance(o, cupy.ndarray)


def test_cuda_matches_numba_on_the_gpu() -> None:
    """Two independent GPU implementations agree closely in float32."""
    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 45, 2, 32, 48, HV=4, seed=6, gk=True, beta_per_v=True))
    import cupy

    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    outs = {}
    for backend in ("cuda", "numba"):
        (o, ht), res = fused_recurrent_gated_delta_rule_fwd(**kw, output_final_state=True, backend=backend)
        outs[backend] = (o, ht, fused_recurrent_gated_delta_rule_bwd(res, do, dht))
    assert_close("o", outs["numba"][0], outs["cuda"][0], ratio=1e-5)
    assert_close("ht", outs["numba"][1], outs["cuda"][1], ratio=1e-5)
    for name in ("q", "k", "v", "gk", "beta", "initial_state"):
        assert_close("d" + name, getattr(outs["numba"][2], name), getattr(outs["cuda"][2], name), ratio=5e-5)


def test_large_grid_many_sequences() -> None:
    """2,050 packed sequences x 32 heads: grids are flattened on x, no 65,535 limit."""
    lens = [16] * 2050
    kw, do, dht = split_op_args(gated_delta_rule_inputs(1, 0, 32, 16, 16, seed=7, seqlens=lens))
    p = make_problem(**kw, output_final_state=True, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)
    import cupy

    (o, ht), res = fused_recurrent_gated_delta_rule_fwd(**to_device(kw), output_final_state=True, backend="cuda")
    assert_close("o", o_ref, o, dtype="float32")
    assert_close("ht", ht_ref, ht, dtype="float32")
    grads = fused_recurrent_gated_delta_rule_bwd(res, cupy.asarray(do), cupy.asarray(dht))
    assert bool(cupy.isfinite(grads.q).all()) and bool(cupy.isfinite(grads.initial_state).all())
