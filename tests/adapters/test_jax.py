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

from ._cases import (  # noqa: E402
    CHUNK_SIZE,
    GRAD_LABEL,
    OPS,
    RICH_CASE,
    Case,
    count_prepare_launches,
    make_case,
    op_cases,
    reference,
)

QKV = ("q", "k", "v")
MODES = ["eager", "jit"]
OP_NAME = {"recurrent": "fused_recurrent_gated_delta_rule", "chunk": "chunk_gated_delta_rule"}


def _call(op: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """rawdelta.jax's `op` (the chunk op with CHUNK_SIZE unless given)."""
    if op == "chunk":
        return rj.chunk_gated_delta_rule(*args, **{"chunk_size": CHUNK_SIZE, **kwargs})
    return rj.fused_recurrent_gated_delta_rule(*args, **kwargs)


def _core(op: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """The core op on numpy arrays (the numpy backend), with the chunk op at CHUNK_SIZE."""
    if op == "chunk":
        return rawdelta.chunk_gated_delta_rule(*args, **{"chunk_size": CHUNK_SIZE, **kwargs})
    return rawdelta.fused_recurrent_gated_delta_rule(*args, **kwargs)


def _ids(params: list[tuple[str, str]]) -> list[str]:
    return [f"{op}-{name}" for op, name in params]


ALL_CASES = op_cases()


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


def _fwd_and_grad(case: Case, arrays: dict[str, Any], mode: str, cu: Any = None, op: str = "recurrent",
                  **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    flags = {**case.flags, **kwargs}
    do = jnp.asarray(case.do, dtype=jnp.float32)
    dht = jnp.asarray(case.dht, dtype=jnp.float32)
    dev = next(iter(arrays["q"].devices()))
    do, dht = jax.device_put(do, dev), jax.device_put(dht, dev)

    def loss(a: dict[str, Any], cu: Any) -> tuple[Any, tuple[Any, Any]]:
        o, ht = _call(op, **a, cu_seqlens=cu, output_final_state=True, **flags)
        return (o.astype(jnp.float32) * do).sum() + (ht * dht).sum(), (o, ht)

    fn = jax.value_and_grad(loss, has_aux=True)
    if mode == "jit":
        fn = jax.jit(fn)
    (_, (o, ht)), grads = fn(arrays, cu)
    return o, ht, grads


def _check(case: Case, arrays: dict[str, Any], dtype: str, mode: str, cu: Any = None, op: str = "recurrent",
           **kwargs: Any) -> None:
    o, ht, grads = _fwd_and_grad(case, arrays, mode, cu, op, **kwargs)
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
@pytest.mark.parametrize(("op", "name"), ALL_CASES, ids=_ids(ALL_CASES))
def test_grad_matches_float64_reference(op: str, name: str, mode: str, x64: None) -> None:
    case = make_case(name, seed=21, op=op)
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens)
    _check(case, _arrays(case, "float64"), "float64", mode, cu, op)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_cpu(op: str, dtype: str, mode: str) -> None:
    case = make_case(RICH_CASE[op], seed=22, op=op)
    _check(case, _arrays(case, dtype), dtype, mode, op=op)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes(chunk_size: int, mode: str, x64: None) -> None:
    """Every chunk size the op takes, on a T that leaves a partial last chunk for each."""
    case = make_case("crosses_chunk", seed=28, op="chunk", T=70)
    _check(case, _arrays(case, "float64"), "float64", mode, op="chunk", chunk_size=chunk_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_naive_reference(op: str, mode: str) -> None:
    case = make_case("grouped_heads", seed=23, op=op, T=20)
    a = _arrays(case, "float32")
    fn = getattr(rj, OP_NAME[op])
    kw = {"chunk_size": CHUNK_SIZE} if op == "chunk" else {}
    if mode == "jit":
        fn = jax.jit(fn, static_argnames=("output_final_state", *kw))
    o, ht = fn(**a, output_final_state=True, **kw)
    ro, rht = rawdelta.naive_recurrent_gated_delta_rule(**{n: np.asarray(x) for n, x in a.items()},
                                                        output_final_state=True)
    assert_close("o", ro, o, dtype="float32")
    assert_close("ht", rht, ht, dtype="float32")
    o2, ht2 = fn(**a, **kw)
    assert ht2 is None
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))


@pytest.mark.parametrize("op", OPS)
def test_positional_arguments_and_defaults_match_core(op: str) -> None:
    """Same positional order and defaults (the chunk op's chunk_size=64 included) as the core op."""
    case = make_case("crosses_chunk", seed=29, op=op, T=70)
    a = {n: np.asarray(x, dtype=np.float32) for n, x in case.arrays.items()}
    pos = [a[n] for n in ("q", "k", "v", "g", "beta")]
    o, ht = getattr(rj, OP_NAME[op])(*map(jnp.asarray, pos), 0.7, jnp.asarray(a["initial_state"]), True)
    ro, rht = getattr(rawdelta, OP_NAME[op])(*pos, 0.7, a["initial_state"], True)
    np.testing.assert_array_equal(np.asarray(o), ro)
    np.testing.assert_array_equal(np.asarray(ht), rht)


def test_public_names_and_signatures_match_core() -> None:
    import inspect

    for name in OP_NAME.values():
        core = inspect.signature(getattr(rawdelta, name)).parameters
        ours = inspect.signature(getattr(rj, name)).parameters
        want = [(p.name, p.kind, p.default) for p in core.values() if p.name not in ("backend", "stream")]
        assert [(p.name, p.kind, p.default) for p in ours.values()] == want, name
        assert name in rj.__all__


@pytest.mark.parametrize("op", OPS)
def test_eager_and_jit_agree_bitwise(op: str) -> None:
    case = make_case("l2norm_sigmoid_gate_in_kernel", seed=24, op=op, T=20)
    a = _arrays(case, "float32")
    eager = _fwd_and_grad(case, a, "eager", op=op)
    jitted = _fwd_and_grad(case, a, "jit", op=op)
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("op", OPS)
def test_traced_cu_seqlens_and_host_copy(op: str) -> None:
    """cu_seqlens as a jit argument (traced: copied to the host inside the callback) or with cu_seqlens_cpu."""
    case = make_case("varlen_crosses_chunk", seed=25, op=op)
    a = _arrays(case, "float32")
    ref_o, ref_ht = _core(op, **{n: np.asarray(x) for n, x in a.items()}, cu_seqlens=case.cu_seqlens,
                          output_final_state=True)

    @jax.jit
    def traced(a: dict[str, Any], cu: Any) -> Any:
        return _call(op, **a, cu_seqlens=cu, output_final_state=True)

    @jax.jit
    def with_host_copy(a: dict[str, Any], cu: Any) -> Any:
        return _call(op, **a, cu_seqlens=cu, cu_seqlens_cpu=case.cu_seqlens, output_final_state=True)

    for fn in (traced, with_host_copy):
        o, ht = fn(a, jnp.asarray(case.cu_seqlens))
        np.testing.assert_array_equal(np.asarray(o), ref_o)
        np.testing.assert_array_equal(np.asarray(ht), ref_ht)


@pytest.mark.parametrize("op", OPS)
def test_vmap(op: str) -> None:
    case = make_case("g_beta", seed=26, op=op)
    a = _arrays(case, "float32")
    qs = jnp.stack([a["q"], 2 * a["q"]])
    rest = {n: x for n, x in a.items() if n != "q"}
    o = jax.vmap(lambda q: _call(op, q, **rest)[0])(qs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(o[i]), np.asarray(_call(op, qs[i], **rest)[0]))


def test_inplace_final_state_returns_the_state() -> None:
    case = make_case("g_beta", seed=27)
    a = _arrays(case, "float32")
    o, ht = rj.fused_recurrent_gated_delta_rule(**a, inplace_final_state=True)
    o_ref, ht_ref = rj.fused_recurrent_gated_delta_rule(**a, output_final_state=True)
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht_ref))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))


@pytest.mark.parametrize("op", OPS)
def test_validation_errors(op: str) -> None:
    case = make_case("g_beta", op=op)
    a = _arrays(case, "float32")
    with pytest.raises(ValueError, match="k must have shape"):
        _call(op, **{**a, "k": a["k"][:, :2]})
    with pytest.raises(TypeError, match="scale"):
        jax.jit(lambda q, s: _call(op, q, a["k"], a["v"], scale=s))(a["q"], 0.5)


def test_chunk_size_is_static() -> None:
    """chunk_size keys the trace: a static argument of jit works, a traced one or a bad value fails at trace time."""
    case = make_case("crosses_chunk", seed=30, op="chunk")
    a = _arrays(case, "float32")
    fn = jax.jit(rj.chunk_gated_delta_rule, static_argnames=("chunk_size", "output_final_state"))
    for cs in (16, np.int64(32)):
        o, ht = fn(**a, chunk_size=cs, output_final_state=True)
        ro, rht = rawdelta.chunk_gated_delta_rule(**{n: np.asarray(x) for n, x in a.items()}, chunk_size=int(cs),
                                                  output_final_state=True)
        np.testing.assert_array_equal(np.asarray(o), ro)
        np.testing.assert_array_equal(np.asarray(ht), rht)
    with pytest.raises(TypeError, match="chunk_size must be a static"):
        jax.jit(lambda q, cs: rj.chunk_gated_delta_rule(q, a["k"], a["v"], chunk_size=cs))(a["q"], 16)
    for bad in (8, True):
        with pytest.raises(ValueError, match=r"chunk_size must be one of \(16, 32, 64\)"):
            fn(**a, chunk_size=bad)  # traced path: caught at trace time
        with pytest.raises(ValueError, match=r"chunk_size must be one of \(16, 32, 64\)"):
            rj.chunk_gated_delta_rule(**a, chunk_size=bad)  # eager path: the core's validation


def test_chunk_op_errors() -> None:
    case = make_case("g_beta", op="chunk")
    a = _arrays(case, "float32")
    beta_per_v = jnp.broadcast_to(a["beta"][..., None], a["v"].shape)
    with pytest.raises(NotImplementedError, match="per value dimension"):
        rj.chunk_gated_delta_rule(**{**a, "beta": beta_per_v})
    with pytest.raises(TypeError, match="gk"):
        rj.chunk_gated_delta_rule(**a, gk=a["q"])


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


GPU_CASES = op_cases(["g_beta", "gk_gv_beta_per_v", "l2norm_sigmoid_gate_in_kernel", "grouped_heads"])


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("op", "name"), GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_matches_reference(op: str, name: str, dtype: str, mode: str) -> None:
    overrides = {**GPU_SHAPE, "HV": 4} if name == "grouped_heads" else GPU_SHAPE
    case = make_case(name, seed=31, op=op, **overrides)
    _check(case, _arrays(case, dtype, _jax_gpu()), dtype, mode, op=op)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_gpu_chunk_sizes(chunk_size: int, mode: str) -> None:
    case = make_case("g_beta", seed=34, op="chunk", **{**GPU_SHAPE, "T": 150})
    _check(case, _arrays(case, "bfloat16", _jax_gpu()), "bfloat16", mode, op="chunk", chunk_size=chunk_size)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_gpu_varlen(op: str, mode: str) -> None:
    case = make_case("varlen_empty_sequence", seed=32, op=op, H=2, K=64, V=32, seqlens=[17, 0, 40, 1])
    cu = jax.device_put(jnp.asarray(case.cu_seqlens), _jax_gpu())
    _check(case, _arrays(case, "float32", _jax_gpu()), "float32", mode, cu, op)


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dtype", "chunk_size"), [("float32", 16), ("bfloat16", 64)])
def test_gpu_chunk_backward_takes_the_forward_factors(dtype: str, chunk_size: int, mode: str,
                                                      monkeypatch: Any) -> None:
    """The chunked op's backward takes the per-chunk factors from the forward's workspace (a residual): prepare
    runs once per step, and the gradients are those of a backward that recomputes the factors, bit for bit."""
    import rawdelta.adapters.jax as adapter

    seen = count_prepare_launches(monkeypatch)
    case = make_case("l2norm_sigmoid_gate_in_kernel", seed=35, op="chunk", **GPU_SHAPE)
    a = _arrays(case, dtype, _jax_gpu())
    kept = jax.block_until_ready(_fwd_and_grad(case, a, mode, op="chunk", chunk_size=chunk_size))
    assert len(seen) == 1
    seen.clear()
    monkeypatch.setattr(adapter, "workspace_nbytes", lambda *args: 0)  # no workspace: the backward recomputes
    recomputed = jax.block_until_ready(_fwd_and_grad(case, a, mode, op="chunk", chunk_size=chunk_size))
    assert len(seen) == 2
    for x, y in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(recomputed)):
        np.testing.assert_array_equal(_host64(x), _host64(y))


@pytest.mark.gpu
@needs_jax_gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_eager_and_jit_agree(op: str) -> None:
    case = make_case("g_beta", seed=33, op=op, **GPU_SHAPE)
    a = _arrays(case, "bfloat16", _jax_gpu())
    eager = _fwd_and_grad(case, a, "eager", op=op)
    jitted = _fwd_and_grad(case, a, "jit", op=op)
    for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(_host64(x), _host64(y))
