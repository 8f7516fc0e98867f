"""``state_v_first`` (and its older name ``transpose_state_layout``) for every op with a state: states held as
``[N, HV, V, K]`` give, transposed, exactly what the default ``[N, HV, K, V]`` layout gives, forward and backward, in
the core and both adapters (the peer's own layers call the ops this way)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops.common.opdef import OpDef

from ._ops import Call, as_tuple, first_case, ops_taking, to_device

V_FIRST = ops_taking("state_v_first")


def _t(x: Any) -> Any:
    return None if x is None else x.swapaxes(-1, -2).copy()


def _run(op: OpDef, c: Call, backend: str, v_first: bool, device: bool = False, **extra: Any) -> tuple[Any, ...]:
    arrays = c.host("float32")
    do, dht = c.cotangents()
    if v_first:
        arrays["initial_state"], dht = _t(arrays["initial_state"]), _t(dht)
        extra["state_v_first"] = True
    kw = {**arrays, "cu_seqlens": c.cu, **c.options, **extra}
    if device:
        import cupy

        kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    outs, res = getattr(rawdelta, f"{op.name}_fwd")(**kw, output_final_state=True, backend=backend)
    grads = getattr(rawdelta, f"{op.name}_bwd")(res, do, dht)
    return (*as_tuple(op, outs), grads)


def _check_transposed(op: OpDef, default: tuple[Any, ...], v_first: tuple[Any, ...]) -> None:
    from rawdelta.testing import to_host

    o, ht, g = default
    o2, ht2, g2 = v_first
    np.testing.assert_array_equal(to_host(o2), to_host(o))
    np.testing.assert_array_equal(to_host(ht2), to_host(_t(ht)))
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
@pytest.mark.parametrize("op", V_FIRST)
def test_cuda_backend(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" in c.params), seed=42)
    _check_transposed(op, _run(op, c, "cuda", False, True), _run(op, c, "cuda", True, True))


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


@pytest.mark.parametrize("op", [p for p in V_FIRST if "inplace_final_state" in p.values[0].takes])
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
