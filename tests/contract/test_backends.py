"""Every backend of every op against the float64 reference, forward and every gradient (dh0 and the final-state
cotangent's path included), on each op's declared awkward shapes, with every buffer rawdelta allocates poisoned
with NaN (tests/conftest.py); and the reference's own hand-written backward against finite differences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.common.opdef import OpCase, OpDef
from rawdelta.ops.common.validation import validate

from ._ops import check_backend, finite_difference, float64, inputs, op_params

ALL_CASES = op_params(cases=True)
SIMULATOR_CASES = op_params(lambda c: c.simulator, cases=True)
TINY_CASES = op_params(lambda c: c.adapters, cases=True)
CUDA_CASES = op_params(cases=True, backend="cuda")
CUDA_TINY_CASES = op_params(lambda c: c.adapters, cases=True, backend="cuda")


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize(("op", "case"), ALL_CASES)
def test_numpy_backend(op: OpDef, case: OpCase, use_dht: bool) -> None:
    """Float64 inputs: the op's numpy backend equals its reference op's to the float64 bound (for a chunked op, the
    chunked algorithm against the recurrence)."""
    kw, do, dht = inputs(op, case, "float64", seed=1)
    check_backend(op, "numpy", float64(kw), do, dht if use_dht else None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("op", "case"), TINY_CASES)
def test_numpy_backend_low_precision_inputs(op: OpDef, case: OpCase, dtype: str) -> None:
    """16- and 32-bit inputs on the numpy backend: outputs and gradients in the inputs' dtypes."""
    kw, do, dht = inputs(op, case, dtype, seed=2)
    check_backend(op, "numpy", kw, do, dht)


@pytest.mark.numba_sim
@pytest.mark.parametrize(("op", "case"), SIMULATOR_CASES)
def test_numba_backend_in_simulator(op: OpDef, case: OpCase) -> None:
    """The Numba reference kernels (the CUDA simulator without a GPU) on the few cases chosen for it."""
    kw, do, dht = inputs(op, case, "float32", seed=3)
    check_backend(op, "numba", kw, do, dht)


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "case"), ALL_CASES)
def test_numba_backend_on_gpu(op: OpDef, case: OpCase) -> None:
    kw, do, dht = inputs(op, case, "float32", seed=4)
    check_backend(op, "numba", kw, do, dht, device=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize(("op", "case"), CUDA_CASES)
def test_cuda_backend(op: OpDef, case: OpCase, use_dht: bool, dtype: str) -> None:
    kw, do, dht = inputs(op, case, dtype, seed=5)
    check_backend(op, "cuda", kw, do, dht if use_dht else None, device=True)


MIXED = [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "float16")]


def _mixed(op: OpDef, case: OpCase, q_dtype: str, v_dtype: str, seed: int) -> tuple[dict[str, Any], Any, Any]:
    from rawdelta.ops.common.inputs import float_dtype

    kw, do, dht = inputs(op, case, q_dtype, seed=seed)
    return {**kw, "v": kw["v"].astype(float_dtype(v_dtype))}, do, dht


@pytest.mark.parametrize(("q_dtype", "v_dtype"), MIXED)
@pytest.mark.parametrize(("op", "case"), TINY_CASES)
def test_mixed_input_dtypes(op: OpDef, case: OpCase, q_dtype: str, v_dtype: str) -> None:
    """q and k in one dtype, v in another (the peer's callers do this): the op computes in the widest of them, o
    comes back in v's dtype and every gradient in its input's dtype."""
    kw, do, dht = _mixed(op, case, q_dtype, v_dtype, seed=8)
    check_backend(op, "numpy", kw, do, dht)


@pytest.mark.gpu
@pytest.mark.parametrize(("q_dtype", "v_dtype"), MIXED)
@pytest.mark.parametrize(("op", "case"), CUDA_TINY_CASES)
def test_mixed_input_dtypes_cuda(op: OpDef, case: OpCase, q_dtype: str, v_dtype: str) -> None:
    kw, do, dht = _mixed(op, case, q_dtype, v_dtype, seed=9)
    check_backend(op, "cuda", kw, do, dht, device=True, dtype="bfloat16")


# ---------------------------------------------------------------------------------------------------------------------
# The reference's backward against float64 finite differences of its forward
# ---------------------------------------------------------------------------------------------------------------------

FD_RTOL = 1e-6


def _loss(op: OpDef, p: Any, do: np.ndarray, dht: np.ndarray | None) -> float:
    outs, _ = op.backends["numpy"].function("forward")(p, None)
    val = float(np.sum(outs[0] * do))
    if dht is not None:
        val += float(np.sum(outs[1] * dht))
    return val


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize(("op", "case"), TINY_CASES)
def test_reference_backward_matches_finite_differences(op: OpDef, case: OpCase, use_dht: bool) -> None:
    """Every element of every gradient of the op's numpy backend (its hand-written backward) against central
    differences of its forward, in float64."""
    kw, do, dht = inputs(op, case, "float64", seed=6)
    kw = float64(kw)
    dht = dht if use_dht and op.has_state else None
    p = validate(op, {**kw, "backend": "numpy", **({"output_final_state": True} if op.has_state else {})})
    grads = op.backends["numpy"].function("backward")(p, None, do, dht)
    # central differences carry an absolute error of about eps |L| / step; gradients far below it (a state behind
    # a strong decay) are compared at that floor
    floor = 1e-8 * max(1.0, abs(_loss(op, p, do, dht)))
    for name in op.differentiable:
        x = getattr(p, name)
        if x is None:
            assert grads.get(name) is None, f"d{name} should be absent"
            continue
        gr = grads.get(name)
        assert gr is not None and gr.shape == x.shape and gr.dtype == np.float64, name
        fd = finite_difference(lambda q: _loss(op, q, do, dht), p, name)
        err, worst = float(np.linalg.norm(gr - fd)), float(np.max(np.abs(gr - fd), initial=0.0))
        bound = FD_RTOL * float(np.linalg.norm(fd)) + floor * np.sqrt(fd.size)
        worst_bound = 10 * FD_RTOL * float(np.max(np.abs(fd), initial=0.0)) + floor
        assert err < bound and worst < worst_bound, (f"d{name}: error {err:.2e} (bound {bound:.2e}), worst element "
                                                     f"{worst:.2e} (bound {worst_bound:.2e})")


# ---------------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------------


def _non_contiguous(a: np.ndarray) -> np.ndarray:
    """The same values as a non-contiguous view: every other element of a buffer twice as wide."""
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    buf[..., ::2] = a
    out = buf[..., ::2]
    assert not out.flags.c_contiguous or a.size <= 1
    return out


@pytest.mark.parametrize(("op", "case"), TINY_CASES)
def test_non_contiguous_inputs_give_the_contiguous_result(op: OpDef, case: OpCase) -> None:
    import rawdelta

    kw, do, dht = inputs(op, case, "float32", seed=7)
    nc = {n: (_non_contiguous(x) if isinstance(x, np.ndarray) and n in op.array_names else x) for n, x in kw.items()}
    fwd, bwd = getattr(rawdelta, f"{op.name}_fwd"), getattr(rawdelta, f"{op.name}_bwd")
    extra = {"output_final_state": True} if op.has_state else {}
    outs, res = fwd(**kw, **extra)
    outs_nc, res_nc = fwd(**nc, **extra)
    for a, b in zip(outs if op.has_state else (outs,), outs_nc if op.has_state else (outs_nc,)):
        np.testing.assert_array_equal(b, a)
    cot = (do, dht) if op.has_state else (do,)
    g, g_nc = bwd(res, *cot), bwd(res_nc, *(_non_contiguous(c) for c in cot))
    for name in g._fields:
        a, b = getattr(g, name), getattr(g_nc, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(b, a, err_msg=name)
