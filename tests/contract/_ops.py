"""What the contract tests share: the registered ops, their declared cases, inputs, and the one comparison of a
backend's outputs and gradients with the float64 reference.

Every test in ``tests/contract`` is parametrised over :func:`rawdelta.ops.registry.ops`, so a registered op gets
them all; its family's tests (``tests/ops``) hold only what is particular to its math.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops import registry
from rawdelta.ops.common.opdef import OpCase, OpDef
from rawdelta.testing import assert_close, grad_label, reference_results, split_op_args, to_device, to_host

OPS = registry.ops()


def _ops_with(backend: str | None) -> list[OpDef]:
    """The registered ops that have `backend` (every op when None). An op is not run on a backend it lacks; that a
    request for one raises UnsupportedConfigError naming the op is tested instead (test_validation.py, and on a GPU
    through both adapters)."""
    return [op for op in OPS if backend is None or backend in op.backends]


def op_params(select: Any = None, *, cases: bool = False, backend: str | None = None) -> list[Any]:
    """``pytest.param(op)`` per registered op (that has `backend`), or with ``cases`` ``pytest.param(op, case)`` per
    declared case for which ``select(case)`` holds (every case without `select`)."""
    if not cases:
        return [pytest.param(op, id=op.name) for op in _ops_with(backend)]
    return [pytest.param(op, c, id=f"{op.name}-{c.label}") for op in _ops_with(backend) for c in op.cases
            if select is None or select(c)]


def ops_taking(name: str, backend: str | None = None) -> list[Any]:
    """``pytest.param(op)`` per registered op (that has `backend`) that takes the argument `name`."""
    return [pytest.param(op, id=op.name) for op in _ops_with(backend) if name in op.takes]


def ops_with_state(backend: str | None = None) -> list[Any]:
    """``pytest.param(op)`` per registered op (that has `backend`) that takes an initial state and returns a final
    state."""
    return [pytest.param(op, id=op.name) for op in _ops_with(backend)
            if op.has_state and any(a.state for a in op.arrays)]


def picks_chunk_size(op: OpDef) -> bool:
    """The op takes ``chunk_size=None`` (its default): it picks the chunk size from the shapes."""
    return "chunk_size" in op.takes and op.option("chunk_size").default is None


def ops_without(backend: str) -> list[Any]:
    """``pytest.param(op)`` per registered op that does not have `backend`."""
    return [pytest.param(op, id=op.name) for op in OPS if backend not in op.backends]


def assert_adapter_signature(module: Any, op: OpDef) -> None:
    """An adapter's function for `op` has the core's parameters (names, kinds, defaults) without backend and
    stream, and is exported."""
    import inspect

    core = inspect.signature(getattr(rawdelta, op.name)).parameters
    ours = inspect.signature(getattr(module, op.name)).parameters
    want = [(p.name, p.kind, p.default) for p in core.values() if p.name not in ("backend", "stream")]
    assert [(p.name, p.kind, p.default) for p in ours.values()] == want
    assert op.name in module.__all__


def inputs(op: OpDef, case: OpCase | dict[str, Any], dtype: str = "float32", seed: int = 0
           ) -> tuple[dict[str, Any], Any, Any]:
    """``(op keyword arguments, do, dht)`` on the host from the family's generator (dht None for ops without a final
    state), the case's call options included."""
    params, call = (case.params, case.call) if isinstance(case, OpCase) else (case, {})
    kw, do, dht = split_op_args(op.family.input_generator()(**params, dtype=dtype, seed=seed))
    kw = {n: x for n, x in kw.items() if n in op.takes}
    return {**kw, **call}, do, (dht if op.has_state else None)


FD_STEP = 1e-6


def finite_difference(loss: Any, p: Any, name: str, step: float = FD_STEP) -> np.ndarray:
    """Central differences of ``loss(problem)`` w.r.t. every element of the problem's float64 array `name`."""
    x = getattr(p, name)
    assert x.dtype == np.float64, name
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += step
        xm[i] -= step
        fd[i] = (loss(p.replace(**{name: xp})) - loss(p.replace(**{name: xm}))) / (2 * step)
    return fd


def float64(kw: dict[str, Any]) -> dict[str, Any]:
    """Every floating array in float64 (the generators keep gates, beta and states in float32)."""
    return {n: (x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x)
            for n, x in kw.items()}


def as_tuple(op: OpDef, outs: Any) -> tuple[Any, ...]:
    return outs if op.has_state else (outs,)


def tolerance_dtype(backend: str, kw: dict[str, Any]) -> str:
    """The tolerance row: the inputs' dtype (the narrowest of q and v); float64 inputs are float64 only on the numpy
    backend (the others compute in float32)."""
    name = min((np.dtype(kw[n].dtype) for n in ("q", "v")), key=lambda dt: dt.itemsize).name
    return "float32" if name == "float64" and backend != "numpy" else name


def check_backend(op: OpDef, backend: str, kw: dict[str, Any], do: Any, dht: Any, *, device: bool = False,
                  dtype: str | None = None) -> None:
    """Run `op` on `backend` (host or device arrays) and compare every output and every gradient (dh0 and the
    final-state cotangent's path included) with the float64 reference; inputs must come back unmodified."""
    dtype = dtype or tolerance_dtype(backend, kw)
    ref_out, ref_grads = reference_results(op, kw, do, dht)
    before = {n: x.copy() for n, x in kw.items() if isinstance(x, np.ndarray)}
    if device:
        import cupy

        kw, do = to_device(kw), cupy.asarray(do)
        dht = None if dht is None else cupy.asarray(dht)
    outs, res = getattr(rawdelta, f"{op.name}_fwd")(**kw, **({"output_final_state": True} if op.has_state else {}),
                                                     backend=backend)
    bwd = getattr(rawdelta, f"{op.name}_bwd")
    grads = bwd(res, do, dht) if op.has_state else bwd(res, do)
    for spec, x in zip(op.outputs, as_tuple(op, outs)):
        assert type(x) is type(kw["q"]), spec.name
        like = kw[spec.like].dtype if spec.like else (np.float64 if kw["q"].dtype == kw["v"].dtype == np.float64
                                                      and backend == "numpy" else np.float32)
        assert x.dtype == like, (spec.name, x.dtype)
        assert_close(spec.name, ref_out[spec.name], x, dtype=dtype)
    for name in grads._fields:
        got = getattr(grads, name)
        if kw.get(name) is None:
            assert got is None, f"gradient of absent input {name}"
            continue
        assert got is not None, f"missing gradient of {name}"
        assert type(got) is type(kw["q"]) and got.shape == kw[name].shape, name
        assert_close(grad_label(name), ref_grads[name], got, dtype=dtype)
    for n, x in before.items():
        np.testing.assert_array_equal(to_host(kw[n]), x, err_msg=f"{n} was modified")


class Call:
    """One call's host inputs split for the adapters: float64 arrays, offsets, static options, cotangents."""

    def __init__(self, op: OpDef, case: OpCase | dict[str, Any], seed: int = 0, **over: Any) -> None:
        params = {**(case.params if isinstance(case, OpCase) else case), **over}
        kw, self.do, self.dht = inputs(op, params, "float64", seed)
        if isinstance(case, OpCase):
            kw.update(case.call)
        self.op = op
        self.arrays = {n: np.asarray(kw.pop(n), np.float64) for n in op.array_names if kw.get(n) is not None}
        self.cu = kw.pop("cu_seqlens", None)
        self.options = kw

    def host(self, dtype: str) -> dict[str, np.ndarray]:
        """The arrays as the adapters take them: compute arrays (q, k, v) in `dtype` (a NumPy or ml_dtypes name), the
        float32 ones in float32 (float64 with float64 inputs)."""
        from rawdelta.ops.common.inputs import float_dtype

        side = np.float64 if dtype == "float64" else np.float32
        return {n: a.astype(side if self.op.family.array(n).float32 else float_dtype(dtype))
                for n, a in self.arrays.items()}

    def cotangents(self) -> tuple[np.ndarray, ...]:
        do = self.do.astype(np.float32)
        return (do, self.dht.astype(np.float32)) if self.op.has_state else (do,)


def first_case(op: OpDef, select: Any = None) -> OpCase:
    """The op's first adapter case (for which ``select(case)`` holds)."""
    return next(c for c in op.cases if c.adapters and (select is None or select(c)))


def rich_case(op: OpDef) -> OpCase:
    """The op's adapter case with the most options and inputs."""
    return max((c for c in op.cases if c.adapters), key=lambda c: sum(bool(v) for v in c.params.values()))


def gpu_call(op: OpDef, case: OpCase, seed: int) -> Call:
    """An adapter case at a shape big enough for the kernels' tiling (T crosses chunks of 16 and 32)."""
    over: dict[str, Any] = dict(GPU_SHAPE)
    if "HV" in case.params:
        over["HV"] = 2 * GPU_SHAPE["H"]
    if "seqlens" in case.params:
        over.update(B=1, T=0, seqlens=(17, 0, 40, 1))
    return Call(op, case, seed=seed, **over)


GPU_SHAPE = {"B": 2, "T": 37, "H": 2, "K": 64, "V": 32}
