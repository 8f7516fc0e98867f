"""rawdelta.jax: custom_vjp gradients, eager (DLPack) and jit (buffer_callback) paths, zero-copy on the GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

# Leave GPU memory to CuPy (the adapter's allocations, and the other test modules): XLA would take 75% at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import rawdelta  # noqa: E402
import rawdelta.jax as rj  # noqa: E402
from rawdelta.testing import assert_close  # noqa: E402

from ._cases import CASES, GRAD_LABEL, Case, make_case, reference  # noqa: E402

QKV = ("q", "k", "v")
MODES = ["eager", "jit"]


def _jax_gpu() -> Any:
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


needs_jax_gpu = pytest.mark.skipif(_jax_gpu() is None, reason="JAX has no GPU backend here")


@pytest.fixture
def x64() -> Iterator[None]:
    """Float64 JAX arrays for this test only (the float64 reference comparison needs them)."""
    old = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def _arrays(case: Case, dtype: str, device: Any = None) -> dict[str, Any]:
    """q, k, v in `dtype`; the others float32 (float64 with float64 q), on `device` (default: CPU)."""
    device = device or jax.devices("cpu")[0]
    side = np.float64 if dtype == "float64" else np.float32
    out = {}
    for n, a in case.arrays.items():
        x = jax.device_put(np.asarray(a, dtype=side), device)
        out[n] = x.astype(jnp.dtype(dtype)) if n in QKV else x
    return out


def _host64(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x, dtype=jnp.float32) if x.dtype == jnp.bfloat16 else x).astype(np.float64)


def _fwd_and_grad(case: Case, arrays: dict[str, Any], mode: str, cu: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    flags = case.flags
    do = jnp.asarray(case.do, dtype=jnp.float32)
    dht = jnp.asarray(case.dht, dtype=jnp.float32)
    dev = next(iter(arrays["q"].devices()))
    do, dht = jax.device_put(do, dev), jax.device_put(dht, dev)

    def loss(a: dict[str, Any], cu: Any) -> tuple[Any, tuple[Any, Any]]:
        o, ht = rj.fused_recurrent_gated_delta_rule(**a, cu_seqlens=cu, output_final_state=True, **flags)
        return (o.astype(jnp.float32) * do).sum() + (ht * dht).sum(), (o, ht)

    fn = jax.value_and_grad(loss, has_aux=True)
    if mode == "jit":
        fn = jax.jit(fn)
    (_, (o, ht)), grads = fn(arrays, cu)
    return o, ht, grads


def _check(case: Case, arrays: dict[str, Any], dtype: str, mode: str, cu: Any = None) -> None:
    o, ht, grads = _fwd_and_grad(case, arrays, mode, cu)
    assert o.dtype == jnp.dtype(dtype) and o.shape == case.arrays["v"].shape
    assert ht.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
    ro, rht, rgrads = reference({n: _host64(x) for n, x in arrays.items()}, case.cu_seqlens, case.flags,
                                case.do, case.dht)
    assert_close("o", ro, _host64(o), dtype=dtype)
    assert_close("ht", rht, _host64(ht), dtype=dtype)
    for n, g in grads.items():
        assert g.dtype == arrays[n].dtype, n
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(g), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# CPU (numpy backend): runs in CI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_grad_matches_float64_reference(name: str, mode: str, x64: None) -> None:
    case = make_case(name, seed=21)
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens)
    _check(case, _arrays(case, "float64"), "float64", mode, cu)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_cpu(dtype: str, mode: str) -> None:
    case = make_case("gk_gv_beta_per_v", seed=22)
    _check(case, _arrays(case, dtype), dtype, mode)


@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_naive_reference(mode: str) -> None:
    case = make_case("grouped_heads", seed=23)
    a = _arrays(case, "float32")
    fn = rj.fused_recurrent_gated_delta_rule
    if mode == "jit":
        fn = jax.jit(fn, static_argnames=("output_final_state",))
    o, ht = fn(**a, output_final_state=True)
    ro, rht = rawdelta.naive_recurrent_gated_delta_rule(**{n: np.asarray(x) for n, x in a.items()},
                                                        output_final_state=True)
    assert_close("o", ro, o, dtype="float32")
    assert_close("ht", rht, ht, dtype="float32")
    o2, ht2 = fn(**a)
    assert ht2 is None
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))


def test_eager_and_jit_agree_bitwise() -> None:
    case = make_case("l2norm_sigmoid_gate_in_kernel", seed=24)
    a = _arrays(case, "float32")
    eager = _fwd_and_grad(case, a, "eager")
    jitted = _fwd_and_grad(case, a, "jit")
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_traced_cu_seqlens_and_host_copy() -> None:
    """cu_seqlens as a jit argument (traced: copied to the host inside the callback) or with cu_seqlens_cpu."""
    case = make_case("varlen_empty_sequence", seed=25)
    a = _arrays(case, "float32")
    ref_o, ref_ht = rawdelta.fused_recurrent_gated_delta_rule(**{n: np.asarray(x) for n, x in a.items()},
                                                              cu_seqlens=case.cu_seqlens, output_final_state=True)

    @jax.jit
    def traced(a: dict[str, Any], cu: Any) -> Any:
        return rj.fused_recurrent_gated_delta_rule(**a, cu_seqlens=cu, output_final_state=True)

    @jax.jit
    def with_host_copy(a: dict[str, Any], cu: Any) -> Any:
        return rj.fused_recurrent_gated_delta_rule(**a, cu_seqlens=cu, cu_seqlens_cpu=case.cu_seqlens,
                                                   output_final_state=True)

    for fn in (traced, with_host_copy):
        o, ht = fn(a, jnp.asarray(case.cu_seqlens))
        np.testing.assert_array_equal(np.asarray(o), ref_o)
        np.testing.assert_array_equal(np.asarray(ht), ref_ht)


def test_vmap() -> None:
    case = make_case("g_beta", seed=26)
    a = _arrays(case, "float32")
    qs = jnp.stack([a["q"], 2 * a["q"]])
    rest = {n: x for n, x in a.items() if n != "q"}
    o = jax.vmap(lambda q: rj.fused_recurrent_gated_delta_rule(q, **rest)[0])(qs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(o[i]),
                                      np.asarray(rj.fused_recurrent_gated_delta_rule(qs[i], **rest)[0]))


def test_inplace_final_state_returns_the_state() -> None:
    case = make_case("g_beta", seed=27)
    a = _arrays(case, "float32")
    o, ht = rj.fused_recurrent_gated_delta_rule(**a, inplace_final_state=True)
    o_ref, ht_ref = rj.fused_recurrent_gated_delta_rule(**a, output_final_state=True)
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht_ref))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))


def test_validation_errors() -> None:
    case = make_case("g_beta")
    a = _arrays(case, "float32")
    with pytest.raises(ValueError, match="k must have shape"):
        rj.fused_recurrent_gated_delta_rule(**{**a, "k": a["k"][:, :2]})
    with pytest.raises(TypeError, match="scale"):
        jax.jit(lambda q, s: rj.fused_recurrent_gated_delta_rule(q, a["k"], a["v"], scale=s))(a["q"], 0.5)


# ----------------------------------------------------------------------------------------------------------------------
# GPU (cuda backend)
# ----------------------------------------------------------------------------------------------------------------------

GPU_SHAPE = {"B": 2, "T": 37, "H": 2, "K": 64, "V": 32}


@pytest.mark.gpu
@needs_jax_gpu
def test_gpu_zero_copy_dlpack() -> None:
    import cupy

    from rawdelta.adapters.jax import _to_cupy

    x = jax.device_put(np.arange(24, dtype=np.float32).reshape(2, 3, 4), _jax_gpu())
    view = _to_cupy(x)
    assert view.data.ptr == x.unsafe_buffer_pointer()
    xb = x.astype(jnp.bfloat16)
    assert _to_cupy(xb).data.ptr == xb.unsafe_buffer_pointer()
    c = cupy.arange(12, dtype=cupy.float32)
    assert jax.dlpack.from_dlpack(c).unsafe_buffer_pointer() == c.data.ptr


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["g_beta", "gk_gv_beta_per_v", "l2norm_sigmoid_gate_in_kernel", "grouped_heads"])
def test_gpu_matches_reference(name: str, dtype: str, mode: str) -> None:
    overrides = {**GPU_SHAPE, "HV": 4} if name == "grouped_heads" else GPU_SHAPE
    case = make_case(name, seed=31, **overrides)
    _check(case, _arrays(case, dtype, _jax_gpu()), dtype, mode)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_varlen(mode: str) -> None:
    case = make_case("varlen_empty_sequence", seed=32, H=2, K=64, V=32, seqlens=[17, 0, 40, 1])
    cu = jax.device_put(jnp.asarray(case.cu_seqlens), _jax_gpu())
    _check(case, _arrays(case, "float32", _jax_gpu()), "float32", mode, cu)


@pytest.mark.gpu
@needs_jax_gpu
def test_gpu_eager_and_jit_agree() -> None:
    case = make_case("g_beta", seed=33, **GPU_SHAPE)
    a = _arrays(case, "bfloat16", _jax_gpu())
    eager = _fwd_and_grad(case, a, "eager")
    jitted = _fwd_and_grad(case, a, "jit")
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(_host64(x), _host64(y))
