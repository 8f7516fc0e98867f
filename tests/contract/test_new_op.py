"""A new op gets its API, its validation, its torch and JAX entry points, its ``rawdelta check`` rows, its benchmark
row and its contract tests from its declaration alone: the two scratch ops of scratch_ops.py (one with a state, one
returning ``o`` only) go through each of them here without a line of glue."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from rawdelta.ops.common.api import public_functions
from rawdelta.ops.common.opdef import OpDef
from rawdelta.testing import assert_close, grad_label, reference_results

from . import _ops
from .scratch_ops import ATTENTION, SIMPLE_GLA

SCRATCH = [pytest.param(SIMPLE_GLA, id="with_state"), pytest.param(ATTENTION, id="o_only")]


def _fns(op: OpDef) -> dict[str, Any]:
    return public_functions(op)


@pytest.mark.parametrize("op", SCRATCH)
def test_core_functions_and_validation(op: OpDef) -> None:
    fns = _fns(op)
    assert {op.name, f"{op.name}_fwd", f"{op.name}_bwd"} <= set(fns)
    assert list(inspect.signature(fns[op.name]).parameters) == list(op.params)
    for case in op.cases:
        kw, do, dht = _ops.inputs(op, case, "float64", seed=1)
        kw = _ops.float64(kw)
        ref_out, ref_grads = reference_results(op, kw, do, dht)
        outs, res = fns[f"{op.name}_fwd"](**kw, **({"output_final_state": True} if op.has_state else {}))
        grads = fns[f"{op.name}_bwd"](res, do, dht) if op.has_state else fns[f"{op.name}_bwd"](res, do)
        for spec, x in zip(op.outputs, _ops.as_tuple(op, outs)):
            assert_close(spec.name, ref_out[spec.name], x, dtype="float64")
        for n, r in ref_grads.items():
            assert_close(grad_label(n), r, getattr(grads, n), dtype="float64")
    kw, _, _ = _ops.inputs(op, op.cases[0], "float32")
    with pytest.raises(ValueError, match=r"k must be 4-D \[B, T, H, K\]"):
        fns[op.name](**{**kw, "k": kw["k"][0]})
    with pytest.raises(TypeError, match=r"v must be an array"):
        fns[op.name](**{**kw, "v": [1.0]})


@pytest.mark.parametrize("op", SCRATCH)
def test_reference_backward_against_finite_differences(op: OpDef) -> None:
    from .test_backends import test_reference_backward_matches_finite_differences as fd

    for case in op.cases:
        fd(op, case, True)


def test_torch_entry_point() -> None:
    torch = pytest.importorskip("torch")
    from rawdelta.adapters import torch as adapter

    for op in (SIMPLE_GLA, ATTENTION):
        fn = adapter.entry_point(op)
        assert list(inspect.signature(fn).parameters) == [p for p in op.params if p not in ("backend", "stream")]
        for case in op.cases:
            c = _ops.Call(op, case)
            ts = {n: torch.from_numpy(a).requires_grad_() for n, a in c.arrays.items()}
            cu = None if c.cu is None else torch.from_numpy(c.cu)

            def f(*xs: Any, _op: OpDef = op, _ts: dict[str, Any] = ts, _cu: Any = cu, _fn: Any = fn) -> Any:
                kw = {**dict(zip(_ts, xs)), "cu_seqlens": _cu}
                return _fn(**kw, output_final_state=True) if _op.has_state else _fn(**kw)

            assert torch.autograd.gradcheck(f, tuple(ts.values()), eps=1e-6, atol=1e-6, rtol=1e-5)
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
            outs = _ops.as_tuple(op, compiled(*ts.values()))
            torch.testing.assert_close(outs[0], _ops.as_tuple(op, f(*ts.values()))[0], rtol=0, atol=0)


def test_jax_entry_point() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from rawdelta.adapters import jax as adapter

    jax.config.update("jax_enable_x64", True)
    try:
        for op in (SIMPLE_GLA, ATTENTION):
            fn = adapter.entry_point(op)
            for case in op.cases:
                c = _ops.Call(op, case)
                a = {n: jnp.asarray(x) for n, x in c.arrays.items()}
                cts = c.cotangents()

                def loss(a: dict[str, Any], _op: OpDef = op, _c: Any = c, _cts: Any = cts, _fn: Any = fn) -> Any:
                    outs = _ops.as_tuple(_op, _fn(**a, cu_seqlens=_c.cu, **({"output_final_state": True}
                                                                          if _op.has_state else {})))
                    return sum(jnp.sum(o * ct) for o, ct in zip(outs, _cts))

                eager, jitted = jax.grad(loss)(a), jax.jit(jax.grad(loss))(a)
                _, ref_grads = reference_results(op, {**c.arrays, "cu_seqlens": c.cu}, *cts)
                for n in a:
                    assert_close(grad_label(n), ref_grads[n], np.asarray(eager[n]), dtype="float64")
                    np.testing.assert_array_equal(np.asarray(eager[n]), np.asarray(jitted[n]))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_check_and_bench_rows() -> None:
    from rawdelta import cli
    from rawdelta.bench.registry import op_spec

    cache: dict[tuple[int, str], Any] = {}
    for case in SIMPLE_GLA.check_cases:
        rows = cli.run_case(SIMPLE_GLA, case, "numpy", "float32", False, cache)
        assert rows and all(r.passed for r in rows), rows
        assert {r.quantity for r in rows} == {"o", "final_state", "dq", "dk", "dv", "dg", "dh0"}
    spec = op_spec(SIMPLE_GLA)
    assert spec.name == SIMPLE_GLA.name and spec.modes == ("forward",) and spec.model == "softmax_attention"
