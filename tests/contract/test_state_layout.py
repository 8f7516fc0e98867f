"""``state_v_first`` (and its older name ``transpose_state_layout``) for every op with a state: states held as
``[N, HV, V, K]`` give, transposed, exactly what the default ``[N, HV, K, V]`` layout gives, forward and backward, in
the core and both adapters (the peer's own layers call the ops this way).

A backend that declares ``NATIVE_STATE_V_FIRST`` gets the caller's state arrays themselves and returns states in the
caller's layout (no transposed copy); the others get a ``[N, HV, K, V]`` copy. On the CPU this module is such a
backend (the numpy backend behind its own transposes), which tests the generic layer's side; on the GPU the cuda
backends are compared, native or not, with the default layout and with the float64 reference.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops import registry
from rawdelta.ops.common import api
from rawdelta.ops.common.opdef import Backend, OpDef
from rawdelta.ops.common.problem import Problem
from rawdelta.ops.common.validation import validate
from rawdelta.testing import assert_close, grad_label, reference_results

from ._ops import Call, as_tuple, first_case, ops_taking, to_device

V_FIRST = ops_taking("state_v_first")
IN_PLACE = [p for p in V_FIRST if "inplace_final_state" in p.values[0].takes]
CUDA_V_FIRST = ops_taking("state_v_first", "cuda")  # the ops with cuda kernels
CUDA_IN_PLACE = [p for p in CUDA_V_FIRST if "inplace_final_state" in p.values[0].takes]


def _t(x: Any) -> Any:
    return None if x is None else x.swapaxes(-1, -2).copy()


def _run(op: OpDef, c: Call, backend: str, v_first: bool, device: bool = False, via: OpDef | None = None,
         **extra: Any) -> tuple[Any, ...]:
    """``(o, final state, grads)`` of a forward and backward on `backend`, states in the layout `v_first` says; `via`:
    the declaration to call through (the op's own by default)."""
    arrays = c.host("float32")
    do, dht = c.cotangents()
    if v_first:
        arrays["initial_state"], dht = _t(arrays["initial_state"]), _t(dht)
        extra["state_v_first"] = True
    kw = {**arrays, "cu_seqlens": c.cu, **c.options, **extra}
    if device:
        import cupy

        kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    outs, res = api.forward(via or op, {**kw, "output_final_state": True, "backend": backend})
    grads = api.backward(res, do, dht)
    return (*as_tuple(op, outs), grads)


def _check_transposed(op: OpDef, default: tuple[Any, ...], v_first: tuple[Any, ...], exact: bool = True) -> None:
    """The two layouts' results agree, transposed: bit for bit, or with `exact` False the outputs within float32's
    tolerance (a backend may have a forward kernel per layout, which sums in another order)."""
    from rawdelta.testing import to_host

    o, ht, g = default
    o2, ht2, g2 = v_first
    same = np.testing.assert_array_equal if exact else (lambda a, b: assert_close("out", b, a, dtype="float32"))
    same(to_host(o2), to_host(o))
    same(to_host(ht2), to_host(_t(ht)))
    for name in g._fields:
        a, b = getattr(g, name), getattr(g2, name)
        assert (a is None) == (b is None), name
        if a is not None:
            want = _t(a) if op.family.array(name).state else a
            np.testing.assert_array_equal(to_host(b), to_host(want), err_msg=name)


@pytest.mark.parametrize("op", V_FIRST)
def test_numpy_backend(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=40)
    _check_transposed(op, _run(op, c, "numpy", False), _run(op, c, "numpy", True))


@pytest.mark.numba_sim
@pytest.mark.parametrize("op", V_FIRST)
def test_numba_backend(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=41)
    _check_transposed(op, _run(op, c, "numba", False), _run(op, c, "numba", True))


@pytest.mark.gpu
@pytest.mark.parametrize("op", CUDA_V_FIRST)
def test_cuda_backend(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=42)
    _check_transposed(op, _run(op, c, "cuda", False, True), _run(op, c, "cuda", True, True), exact=False)


@pytest.mark.parametrize("op", V_FIRST)
def test_older_name_and_both(op: OpDef) -> None:
    c = Call(op, first_case(op), seed=43)
    arrays = c.host("float32")
    arrays["initial_state"] = _t(arrays["initial_state"])
    kw = {**arrays, "cu_seqlens": c.cu, **c.options, "output_final_state": True}
    fn = getattr(rawdelta, op.name)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout is deprecated: use state_v_first"):
        old = fn(**kw, transpose_state_layout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = fn(**kw, state_v_first=True)
    for a, b in zip(as_tuple(op, old), as_tuple(op, new)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="transpose_state_layout is the older name of state_v_first"):
        fn(**kw, state_v_first=True, transpose_state_layout=True)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, \w+, V, K\]"):
        fn(**{**kw, "initial_state": _t(kw["initial_state"][..., :1, :])}, state_v_first=True)


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_final_state(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=44)
    arrays = c.host("float32")
    _, ht = getattr(rawdelta, op.name)(**arrays, **c.options, output_final_state=True)
    state = _t(arrays["initial_state"])
    _, ht2 = getattr(rawdelta, op.name)(**{**arrays, "initial_state": state}, **c.options, state_v_first=True,
                                        inplace_final_state=True)
    assert ht2 is state
    np.testing.assert_array_equal(state, _t(ht))


@pytest.mark.parametrize("op", V_FIRST)
def test_torch_adapter(op: OpDef) -> None:
    torch = pytest.importorskip("torch")
    import rawdelta.torch as rt

    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=45)
    arrays = {n: torch.from_numpy(a).requires_grad_() for n, a in c.arrays.items()}
    cu = torch.from_numpy(c.cu)
    arrays_t = {**arrays, "initial_state": arrays["initial_state"].detach().transpose(-1, -2).contiguous()
                .requires_grad_()}
    fn = getattr(rt, op.name)
    o, ht = fn(**arrays, cu_seqlens=cu, **c.options, output_final_state=True)
    o2, ht2 = fn(**arrays_t, cu_seqlens=cu, **c.options, output_final_state=True, state_v_first=True)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    torch.testing.assert_close(ht2, ht.transpose(-1, -2), rtol=0, atol=0)
    compiled = torch.compile(lambda: fn(**arrays_t, cu_seqlens=cu, **c.options, output_final_state=True,
                                        state_v_first=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled()[1], ht2, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        _, ht3 = fn(**arrays_t, cu_seqlens=cu, **c.options, output_final_state=True, transpose_state_layout=True)
    torch.testing.assert_close(ht3, ht2, rtol=0, atol=0)
    (ht.sum() + o.sum()).backward()
    (ht2.sum() + o2.sum()).backward()
    torch.testing.assert_close(arrays_t["initial_state"].grad, arrays["initial_state"].grad.transpose(-1, -2),
                               rtol=0, atol=0)


@pytest.mark.parametrize("op", V_FIRST)
def test_jax_adapter(op: OpDef) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import rawdelta.jax as rj

    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=46)
    a = {n: jnp.asarray(x, jnp.float32) for n, x in c.arrays.items()}
    fn = getattr(rj, op.name)

    def loss(a: dict[str, Any], v_first: bool) -> Any:
        o, ht = fn(**a, cu_seqlens=c.cu, **c.options, output_final_state=True, state_v_first=v_first)
        return jnp.sum(o) + jnp.sum(ht * jnp.arange(ht.size, dtype=ht.dtype).reshape(ht.shape))

    def loss_t(a: dict[str, Any]) -> Any:
        o, ht = fn(**a, cu_seqlens=c.cu, **c.options, output_final_state=True, state_v_first=True)
        w = jnp.arange(ht.size, dtype=ht.dtype).reshape(ht.shape[:-2] + ht.shape[:-3:-1]).swapaxes(-1, -2)
        return jnp.sum(o) + jnp.sum(ht * w)

    at = {**a, "initial_state": a["initial_state"].swapaxes(-1, -2)}
    g = jax.grad(loss)(a, False)
    g2 = jax.jit(jax.grad(loss_t))(at)
    np.testing.assert_array_equal(np.asarray(g2["q"]), np.asarray(g["q"]))
    np.testing.assert_array_equal(np.asarray(g2["initial_state"]), np.asarray(g["initial_state"]).swapaxes(-1, -2))
    _, ht = fn(**a, cu_seqlens=c.cu, **c.options, output_final_state=True)
    _, ht2 = jax.jit(lambda a: fn(**a, cu_seqlens=c.cu, **c.options, output_final_state=True,
                                  state_v_first=True))(at)
    np.testing.assert_array_equal(np.asarray(ht2), np.asarray(ht).swapaxes(-1, -2))


# ---------------------------------------------------------------------------------------------------------------------
# A backend that reads and writes the caller's layout
# ---------------------------------------------------------------------------------------------------------------------

NATIVE_STATE_V_FIRST = True  # this module, as a backend (_native): the op's numpy backend behind its own transposes


def _numpy_backend(p: Problem) -> Backend:
    return registry.op(p.op.name).backends["numpy"]


def _k_first(p: Problem) -> Problem:
    return p.replace(initial_state=_t(p.initial_state)) if p.state_layout_native else p


def forward(p: Problem, workspace: Any = None) -> tuple[tuple[Any, Any], Any]:
    """The backend protocol's forward: the final state in the caller's layout."""
    (o, ht), saved = _numpy_backend(p).function("forward")(_k_first(p), workspace)
    return (o, _t(ht) if p.state_layout_native else ht), saved


def backward(p: Problem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The backend protocol's backward: dht taken and dh0 returned in the caller's layout."""
    native = p.state_layout_native
    grads = _numpy_backend(p).function("backward")(_k_first(p), saved, do, _t(dht) if native else dht)
    return {**grads, "initial_state": _t(grads["initial_state"]) if native else grads["initial_state"]}


def _native(op: OpDef) -> OpDef:
    """`op` with this module as its numpy backend."""
    return dataclasses.replace(op, backends={**op.backends, "numpy": Backend(__name__)})


@pytest.mark.parametrize("op", V_FIRST)
def test_native_backend_gets_the_callers_state(op: OpDef) -> None:
    c = Call(op, first_case(op), seed=47)
    arrays = c.host("float32")
    state = _t(arrays["initial_state"])
    args = {**arrays, "initial_state": state, "cu_seqlens": c.cu, **c.options, "state_v_first": True}
    p = validate(_native(op), args)
    assert p.state_layout_native and p.initial_state is state
    p = validate(op, args)
    assert not p.state_layout_native
    np.testing.assert_array_equal(p.initial_state, arrays["initial_state"])
    p = validate(_native(op), {**args, "initial_state": arrays["initial_state"], "state_v_first": False})
    assert not p.state_layout_native and p.initial_state is arrays["initial_state"]


@pytest.mark.parametrize("op", V_FIRST)
def test_native_backend_forward_and_backward(op: OpDef) -> None:
    """The generic layer neither copies nor transposes the states of a native backend, and the results are the
    default layout's, transposed."""
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=48)
    _check_transposed(op, _run(op, c, "numpy", False), _run(op, c, "numpy", True, via=_native(op)))


@pytest.mark.parametrize("op", IN_PLACE)
def test_native_backend_in_place(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=49)
    arrays = c.host("float32")
    _, ht = getattr(rawdelta, op.name)(**arrays, **c.options, output_final_state=True)
    state = _t(arrays["initial_state"])
    (_, ht2), _ = api.forward(_native(op), {**arrays, **c.options, "initial_state": state, "state_v_first": True,
                                            "inplace_final_state": True})
    assert ht2 is state
    np.testing.assert_array_equal(state, _t(ht))


def test_the_decode_kernel_is_native() -> None:
    assert registry.op("fused_recurrent_gated_delta_rule").backends["cuda"].native_state_v_first


# ---------------------------------------------------------------------------------------------------------------------
# The cuda backends
# ---------------------------------------------------------------------------------------------------------------------

# The recurrent forward's paths: the decode step (T = 1) with 16-byte state accesses in both layouts, K = 256, K off
# the 4-row granule and a partial column block (element accesses), 16 rows (one row per thread), packed sequences.
GPU_SHAPES = {
    "decode_T1": {"B": 8, "T": 1, "H": 2, "HV": 4, "K": 128, "V": 128},
    "K256": {"B": 2, "T": 9, "H": 1, "K": 256, "V": 64},
    "K37_V40": {"B": 2, "T": 7, "H": 1, "K": 37, "V": 40},
    "K16_V8": {"B": 3, "T": 5, "H": 1, "K": 16, "V": 8},
    "varlen": {"B": 1, "T": 0, "H": 2, "K": 64, "V": 64, "seqlens": (5, 0, 1, 12)},
}


def _gpu_shape(op: OpDef, shape: str) -> dict:
    """GPU_SHAPES[shape] in the op's symbols: HV (value heads apart from key heads) only for families that have it;
    K and V clamped to the cuda backend's declared limits (``OpDef.limits``)."""
    has_hv = any("HV" in a.shape for a in op.family.arrays)
    caps = {n: cap for n, (cap, _) in op.limits.get("cuda", {}).items()}
    return {n: min(x, caps.get(n, x)) for n, x in GPU_SHAPES[shape].items() if n != "HV" or has_hv}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("op", CUDA_V_FIRST)
def test_cuda_layouts(op: OpDef, shape: str) -> None:
    """Both layouts agree (the gradients bit for bit), and match the float64 reference, forward and backward."""
    c = Call(op, _gpu_shape(op, shape), seed=50)
    default, v_first = _run(op, c, "cuda", False, True), _run(op, c, "cuda", True, True)
    _check_transposed(op, default, v_first, exact=False)
    from rawdelta.testing import to_host

    ref_out, ref_grads = reference_results(op, {**c.host("float32"), "cu_seqlens": c.cu, **c.options},
                                           *c.cotangents())
    o, ht, grads = v_first
    assert_close("o", ref_out["o"], o, dtype="float32")
    assert_close("final_state", ref_out["final_state"], _t(to_host(ht)), dtype="float32")
    for name, ref in ref_grads.items():
        got = to_host(getattr(grads, name))
        assert_close(grad_label(name), ref, _t(got) if op.family.array(name).state else got, dtype="float32")


@pytest.mark.gpu
@pytest.mark.parametrize("op", CUDA_V_FIRST)
def test_cuda_native_backend_takes_the_callers_state(op: OpDef) -> None:
    import cupy

    c = Call(op, _gpu_shape(op, "decode_T1"), seed=51)
    kw = to_device({**c.host("float32"), **c.options})
    state = cupy.ascontiguousarray(kw["initial_state"].swapaxes(-1, -2))
    p = validate(op, {**kw, "initial_state": state, "state_v_first": True, "backend": "cuda"})
    native = op.backends["cuda"].native_state_v_first
    assert p.state_layout_native == native
    assert (p.initial_state is state) == native


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["decode_T1", "K37_V40", "varlen"])
@pytest.mark.parametrize("op", CUDA_IN_PLACE)
def test_cuda_in_place(op: OpDef, shape: str) -> None:
    """state_v_first with inplace_final_state writes the caller's [N, HV, V, K] state itself."""
    import cupy

    from rawdelta.testing import to_host

    c = Call(op, _gpu_shape(op, shape), seed=52)
    kw = to_device({**c.host("float32"), "cu_seqlens": c.cu, **c.options})
    fn = getattr(rawdelta, op.name)
    o, ht = fn(**kw, output_final_state=True, backend="cuda")
    state = cupy.ascontiguousarray(kw["initial_state"].swapaxes(-1, -2))
    ptr = state.data.ptr
    o2, ht2 = fn(**{**kw, "initial_state": state}, state_v_first=True, inplace_final_state=True, backend="cuda")
    assert ht2 is state and state.data.ptr == ptr
    assert_close("o", to_host(o), to_host(o2), dtype="float32")
    assert_close("final_state", _t(to_host(ht)), to_host(state), dtype="float32")
