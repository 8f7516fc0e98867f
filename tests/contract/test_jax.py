"""rawdelta.jax for every op: custom_vjp gradients, the eager (DLPack) and jit (buffer_callback) paths, zero-copy on
the GPU; each op on its declared adapter cases against the float64 reference."""

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
from rawdelta.ops.common.opdef import OpCase, OpDef  # noqa: E402
from rawdelta.testing import assert_close, grad_label, reference_results  # noqa: E402

from ._ops import (  # noqa: E402
    OPS,
    Call,
    assert_adapter_signature,
    first_case,
    gpu_call,
    op_params,
    ops_taking,
    ops_without,
    picks_chunk_size,
    rich_case,
)

MODES = ["eager", "jit"]
ADAPTER_CASES = op_params(lambda c: c.adapters, cases=True)
CUDA_ADAPTER_CASES = op_params(lambda c: c.adapters, cases=True, backend="cuda")


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


def arrays(c: Call, dtype: str, device: Any = None) -> dict[str, Any]:
    """The call's arrays on `device` (default: the CPU): q, k, v in `dtype`, the float32 ones in float32."""
    device = device or jax.devices("cpu")[0]
    side = np.float64 if dtype == "float64" else np.float32
    out = {}
    for n, a in c.arrays.items():
        x = jax.device_put(np.asarray(a, dtype=side), device)
        out[n] = x if c.op.family.array(n).float32 else x.astype(jnp.dtype(dtype))
    return out


def _host64(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x, dtype=jnp.float32) if x.dtype == jnp.bfloat16 else x).astype(np.float64)


def _outs(op: OpDef, out: Any) -> tuple[Any, ...]:
    return out if op.has_state else (out,)


def _run(c: Call, a: dict[str, Any], cu: Any = None, **kwargs: Any) -> tuple[Any, ...]:
    extra = {"output_final_state": True} if c.op.has_state else {}
    return _outs(c.op, getattr(rj, c.op.name)(**a, cu_seqlens=cu, **c.options, **extra, **kwargs))


def _fwd_and_grad(c: Call, a: dict[str, Any], mode: str, cu: Any = None, **kwargs: Any
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    dev = next(iter(a["q"].devices()))
    cts = tuple(jax.device_put(jnp.asarray(x), dev) for x in c.cotangents())

    def loss(a: dict[str, Any], cu: Any) -> tuple[Any, tuple[Any, ...]]:
        outs = _run(c, a, cu, **kwargs)
        return sum((o.astype(jnp.float32) * ct).sum() for o, ct in zip(outs, cts)), outs

    fn = jax.value_and_grad(loss, has_aux=True)
    if mode == "jit":
        fn = jax.jit(fn)
    (_, outs), grads = fn(a, cu)
    return outs, grads


def _check(c: Call, a: dict[str, Any], dtype: str, mode: str, cu: Any = None, **kwargs: Any) -> None:
    outs, grads = _fwd_and_grad(c, a, mode, cu, **kwargs)
    kw = {**{n: _host64(x) for n, x in a.items()}, "cu_seqlens": c.cu, **c.options, **kwargs}
    ref_out, ref_grads = reference_results(c.op, kw, *c.cotangents())
    for spec, o in zip(c.op.outputs, outs):
        want = jnp.dtype(dtype) if spec.like else (jnp.float64 if dtype == "float64" else jnp.float32)
        assert o.dtype == want, spec.name
        assert_close(spec.name, ref_out[spec.name], _host64(o), dtype=dtype)
    for n, g in grads.items():
        assert g.dtype == a[n].dtype, n
        assert_close(grad_label(n), ref_grads[n], _host64(g), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# CPU (numpy backend): runs in CI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("op", "case"), ADAPTER_CASES)
def test_grad_matches_float64_reference(op: OpDef, case: OpCase, mode: str, x64: None) -> None:
    c = Call(op, case, seed=20)
    _check(c, arrays(c, "float64"), "float64", mode, None if c.cu is None else jnp.asarray(c.cu))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", op_params())
def test_low_precision_cpu(op: OpDef, dtype: str, mode: str) -> None:
    c = Call(op, rich_case(op), seed=21)
    _check(c, arrays(c, dtype), dtype, mode, None if c.cu is None else jnp.asarray(c.cu))


@pytest.mark.parametrize("op", ops_taking("chunk_size"))
def test_every_chunk_size(op: OpDef, x64: None) -> None:
    case = first_case(op, lambda c: "seqlens" not in c.params)
    c = Call(op, case, seed=22, T=70)
    fn = jax.jit(getattr(rj, op.name), static_argnames=tuple(o.name for o in op.adapter_options))
    for chunk_size in op.chunk_sizes:
        _check(c, arrays(c, "float64"), "float64", "eager", chunk_size=chunk_size)
        # chunk_size keys the trace: a static argument of jit works, numpy integers too
        outs = _outs(op, fn(**arrays(c, "float32"), **{**c.options, "chunk_size": np.int64(chunk_size)}))
        want = _outs(op, getattr(rawdelta, op.name)(**{n: np.asarray(x) for n, x in arrays(c, "float32").items()},
                                                    **{**c.options, "chunk_size": chunk_size}))
        np.testing.assert_array_equal(np.asarray(outs[0]), want[0])


@pytest.mark.parametrize("op", op_params())
def test_signature_matches_core(op: OpDef) -> None:
    assert_adapter_signature(rj, op)


@pytest.mark.parametrize("op", op_params())
def test_eager_and_jit_agree_bitwise(op: OpDef) -> None:
    c = Call(op, rich_case(op), seed=24)
    a = arrays(c, "float32")
    eager = _fwd_and_grad(c, a, "eager")
    jitted = _fwd_and_grad(c, a, "jit")
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("op", op_params())
def test_traced_cu_seqlens_and_host_copy(op: OpDef) -> None:
    """cu_seqlens as a jit argument (traced: copied to the host inside the callback) or with cu_seqlens_cpu."""
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=25)
    a = arrays(c, "float32")
    want = _outs(op, getattr(rawdelta, op.name)(**{n: np.asarray(x) for n, x in a.items()}, cu_seqlens=c.cu,
                                                **c.options, **({"output_final_state": True} if op.has_state
                                                                else {})))

    @jax.jit
    def traced(a: dict[str, Any], cu: Any) -> Any:
        return _run(c, a, cu)

    @jax.jit
    def with_host_copy(a: dict[str, Any], cu: Any) -> Any:
        return _run(c, a, cu, cu_seqlens_cpu=c.cu)

    for fn in (traced, with_host_copy):
        for x, y in zip(fn(a, jnp.asarray(c.cu)), want):
            np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("op", op_params())
def test_vmap(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=26)
    a = arrays(c, "float32")
    qs = jnp.stack([a["q"], 2 * a["q"]])
    rest = {n: x for n, x in a.items() if n != "q"}
    o = jax.vmap(lambda q: _run(c, {**rest, "q": q})[0])(qs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(o[i]), np.asarray(_run(c, {**rest, "q": qs[i]})[0]))


@pytest.mark.parametrize("op", ops_taking("inplace_final_state"))
def test_inplace_final_state_returns_the_state(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=27)
    a = arrays(c, "float32")
    o, ht = getattr(rj, op.name)(**a, **c.options, inplace_final_state=True)
    o_ref, ht_ref = _run(c, a)
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht_ref))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))


@pytest.mark.parametrize("op", op_params())
def test_validation_errors(op: OpDef) -> None:
    c = Call(op, first_case(op), seed=28)
    a = arrays(c, "float32")
    fn = getattr(rj, op.name)
    with pytest.raises(ValueError, match="k must have shape"):
        fn(**{**a, "k": a["k"][:, :1]}, **c.options)
    rest = {n: a[n] for n in op.array_names if op.family.array(n).required and n not in ("q", "k", "v")}
    if "scale" in op.takes:
        with pytest.raises(TypeError, match="scale must be a static"):
            jax.jit(lambda q, s: fn(q, a["k"], a["v"], **rest, scale=s))(a["q"], 0.5)
        with pytest.raises(ValueError, match="scale must be"):
            fn(**a, **c.options, scale="abc")
    if "chunk_size" in op.takes:
        with pytest.raises(TypeError, match="chunk_size must be a static"):
            jax.jit(lambda q, cs: fn(q, a["k"], a["v"], **rest, chunk_size=cs))(a["q"], 16)
        jitted = jax.jit(fn, static_argnames=("chunk_size",))
        for bad in (8, True, 64.0, *(() if picks_chunk_size(op) else (None,))):
            with pytest.raises(ValueError, match=r"chunk_size must be one of"):
                jitted(**a, chunk_size=bad)  # traced path: caught at trace time
            with pytest.raises(ValueError, match=r"chunk_size must be one of"):
                fn(**a, chunk_size=bad)  # eager path


@pytest.mark.parametrize("op", op_params())
def test_shapes_and_offsets_are_checked_at_trace_time(op: OpDef) -> None:
    """Under jax.jit shapes are static: a bad one raises the core's ValueError when the function is traced, not an
    XLA runtime error from inside the callback; a 2-D or non-integer cu_seqlens is refused, not truncated."""
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=29)
    a = arrays(c, "float32")
    fn = getattr(rj, op.name)
    traced = jax.jit(lambda a, cu: fn(**a, cu_seqlens=cu, **c.options))
    with pytest.raises(ValueError, match=r"k must have shape"):
        traced.lower({**a, "k": a["k"][:, :1]}, jnp.asarray(c.cu))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D vector"):
        traced.lower(a, jnp.asarray(c.cu)[None])
    for bad in (c.cu[None], c.cu.astype(np.float64) + 0.5):
        with pytest.raises(ValueError, match=r"cu_seqlens"):
            fn(**a, cu_seqlens=bad, **c.options)


def test_every_registered_op_has_an_entry_point() -> None:
    assert sorted(rj.__all__) == sorted(op.name for op in OPS)


# ----------------------------------------------------------------------------------------------------------------------
# GPU (cuda backend)
# ----------------------------------------------------------------------------------------------------------------------


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
@pytest.mark.parametrize(("op", "case"), CUDA_ADAPTER_CASES)
def test_gpu_matches_reference(op: OpDef, case: OpCase, dtype: str, mode: str) -> None:
    c = gpu_call(op, case, 31)
    cu = None if c.cu is None else jax.device_put(jnp.asarray(c.cu), _jax_gpu())
    _check(c, arrays(c, dtype, _jax_gpu()), dtype, mode, cu)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ops_taking("chunk_size", "cuda"))
def test_gpu_every_chunk_size(op: OpDef, mode: str) -> None:
    from ._ops import GPU_SHAPE

    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=34, **{**GPU_SHAPE, "T": 150})
    for chunk_size in op.chunk_sizes:
        _check(c, arrays(c, "bfloat16", _jax_gpu()), "bfloat16", mode, chunk_size=chunk_size)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("op", op_params(backend="cuda"))
def test_gpu_eager_and_jit_agree(op: OpDef) -> None:
    c = gpu_call(op, first_case(op, lambda c: "seqlens" not in c.params), 33)
    a = arrays(c, "bfloat16", _jax_gpu())
    eager = _fwd_and_grad(c, a, "eager")
    jitted = _fwd_and_grad(c, a, "jit")
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(_host64(x), _host64(y))


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("op", ops_without("cuda"))
def test_gpu_op_without_cuda_kernels_refuses(op: OpDef) -> None:
    """GPU arrays run the cuda backend; an op without cuda kernels refuses them with the core's error."""
    from rawdelta.errors import UnsupportedConfigError

    c = gpu_call(op, first_case(op), 35)
    with pytest.raises(UnsupportedConfigError, match=rf"{op.name} has no 'cuda' backend"):
        _fwd_and_grad(c, arrays(c, "float32", _jax_gpu()), "eager")
