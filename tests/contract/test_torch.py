"""rawdelta.torch for every op: autograd, custom ops, torch.compile, CUDA graphs, streams and the torch allocator.

Every test runs each registered op on its declared adapter cases (``OpCase.adapters``: tiny, so that gradcheck is
cheap) and compares with the float64 reference (the numpy backend of the op's reference op).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rawdelta  # noqa: E402
import rawdelta.torch as rt  # noqa: E402
from rawdelta.ops.common.opdef import KEYWORD_ONLY, OpCase, OpDef  # noqa: E402
from rawdelta.testing import assert_close, grad_label, reference_results  # noqa: E402

from ._ops import (  # noqa: E402
    GPU_SHAPE,
    OPS,
    Call,
    assert_adapter_signature,
    first_case,
    gpu_call,
    op_params,
    ops_taking,
    ops_with_state,
    ops_without,
    picks_chunk_size,
    rich_case,
)

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
ADAPTER_CASES = op_params(lambda c: c.adapters, cases=True)
CUDA_ADAPTER_CASES = op_params(lambda c: c.adapters, cases=True, backend="cuda")


def tensors(c: Call, dtype: str, device: str = "cpu", requires_grad: bool = True) -> dict[str, Any]:
    """The call's arrays as tensors: q, k, v in `dtype`, the float32 ones in float32 (float64 with float64 inputs)."""
    side = torch.float64 if dtype == "float64" else torch.float32
    return {n: torch.from_numpy(a).to(device=device, dtype=side if c.op.family.array(n).float32
                                      else TORCH_DTYPES[dtype]).requires_grad_(requires_grad)
            for n, a in c.arrays.items()}


def cu_seqlens(c: Call, device: str = "cpu") -> Any:
    return None if c.cu is None else torch.from_numpy(c.cu).to(device)


def cotangents(c: Call, device: str = "cpu") -> tuple[Any, ...]:
    return tuple(torch.from_numpy(x).to(device) for x in c.cotangents())


def _outs(op: OpDef, out: Any) -> tuple[Any, ...]:
    return out if op.has_state else (out,)


def _run(c: Call, ts: dict[str, Any], device: str = "cpu", **kwargs: Any) -> tuple[Any, ...]:
    extra = {"output_final_state": True} if c.op.has_state else {}
    return _outs(c.op, getattr(rt, c.op.name)(**ts, cu_seqlens=cu_seqlens(c, device), **c.options, **extra, **kwargs))


def _loss(outs: tuple[Any, ...], cts: tuple[Any, ...]) -> Any:
    return sum((o.float() * ct).sum() for o, ct in zip(outs, cts))


def _host64(t: Any) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _reference(c: Call, ts: dict[str, Any], cts: tuple[Any, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    kw = {**{n: _host64(t) for n, t in ts.items()}, "cu_seqlens": c.cu, **c.options}
    return reference_results(c.op, kw, *(_host64(x) for x in cts))


def _check_against_reference(c: Call, dtype: str, device: str = "cpu", **kwargs: Any) -> None:
    ts = tensors(c, dtype, device)
    outs = _run(c, ts, device, **kwargs)
    cts = cotangents(c, device)
    _loss(outs, cts).backward()
    ref_out, ref_grads = _reference(c, ts, cts)
    for spec, o in zip(c.op.outputs, outs):
        want = TORCH_DTYPES[dtype] if spec.like else (torch.float64 if dtype == "float64" else torch.float32)
        assert o.dtype == want and o.device.type == device, spec.name
        assert_close(spec.name, ref_out[spec.name], _host64(o), dtype=dtype)
    for n, t in ts.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, n
        assert_close(grad_label(n), ref_grads[n], _host64(t.grad), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# CPU (numpy backend): runs in CI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "case"), ADAPTER_CASES)
def test_gradcheck_float64(op: OpDef, case: OpCase) -> None:
    c = Call(op, case)
    ts = tensors(c, "float64")
    names = list(ts)

    def f(*xs: Any) -> tuple[Any, ...]:
        # Every output is checked, so the final-state cotangent (dht) is covered too.
        return _run(c, dict(zip(names, xs)))

    assert torch.autograd.gradcheck(f, tuple(ts[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("op", "case"), ADAPTER_CASES)
def test_cpu_matches_reference(op: OpDef, case: OpCase, dtype: str) -> None:
    _check_against_reference(Call(op, case, seed=1), dtype)


@pytest.mark.parametrize("op", ops_taking("chunk_size"))
def test_every_chunk_size(op: OpDef) -> None:
    """Every chunk size the op takes, on a T that leaves a partial last chunk for each."""
    case = first_case(op, lambda c: "seqlens" not in c.params)
    for chunk_size in op.chunk_sizes:
        _check_against_reference(Call(op, case, seed=2, T=70), "float64", chunk_size=chunk_size)


@pytest.mark.parametrize("op", op_params())
def test_signature_matches_core(op: OpDef) -> None:
    assert_adapter_signature(rt, op)


@pytest.mark.parametrize("op", op_params())
def test_positional_arguments_match_core(op: OpDef) -> None:
    """The positional parameters in the core's order give the core's result, bit for bit."""
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=3)
    positional = op.signature[:op.signature.index(KEYWORD_ONLY)]
    ts = tensors(c, "float32", requires_grad=False)
    values = {**ts, **c.options, "output_final_state": True, "scale": 0.7}
    args = [values.get(n) for n in positional]
    core_args = [(v.numpy() if isinstance(v, torch.Tensor) else v) for v in args]
    keyword = {n: v for n, v in c.options.items() if n not in positional}
    got = _outs(op, getattr(rt, op.name)(*args, **keyword))
    want = _outs(op, getattr(rawdelta, op.name)(*core_args, **keyword))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("op", ops_with_state())
def test_gradient_from_each_output_alone(op: OpDef) -> None:
    """An unused output reaches the backward as None (o) or as no dht at all (the final state)."""
    c = Call(op, first_case(op), seed=4)
    for used in range(2):
        ts = tensors(c, "float64")
        outs = _run(c, ts)
        cts = tuple(ct.double() if i == used else torch.zeros_like(o) for i, (o, ct) in
                    enumerate(zip(outs, cotangents(c))))
        (outs[used] * cts[used]).sum().backward()
        _, ref_grads = _reference(c, ts, cts)
        for n, t in ts.items():
            assert_close(grad_label(n), ref_grads[n], _host64(t.grad), dtype="float64")


@pytest.mark.parametrize("op", ops_with_state())
def test_no_final_state_has_no_state_cotangent(op: OpDef) -> None:
    c = Call(op, first_case(op), seed=5)
    ts = tensors(c, "float64")
    o, ht = getattr(rt, op.name)(**ts, cu_seqlens=cu_seqlens(c), **c.options)
    assert ht is None
    do = cotangents(c)[0].double()
    (o * do).sum().backward()
    kw = {**{n: _host64(t) for n, t in ts.items()}, "cu_seqlens": c.cu, **c.options}
    _, ref_grads = reference_results(op, kw, _host64(do), None)
    for n, t in ts.items():
        assert_close(grad_label(n), ref_grads[n], _host64(t.grad), dtype="float64")


@pytest.mark.parametrize("op", op_params())
def test_non_contiguous_inputs(op: OpDef) -> None:
    c = Call(op, first_case(op), seed=6)
    ts = tensors(c, "float32", requires_grad=False)
    q_nc = ts["q"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q_nc.is_contiguous()
    torch.testing.assert_close(_run(c, {**ts, "q": q_nc})[0], _run(c, ts)[0], rtol=0, atol=0)


@pytest.mark.parametrize("op", ops_taking("inplace_final_state"))
def test_inplace_final_state(op: OpDef) -> None:
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=7)
    ts = tensors(c, "float32", requires_grad=False)
    o_ref, ht_ref = _run(c, ts)
    state = ts["initial_state"].clone()
    fn = getattr(rt, op.name)
    o, ht = fn(**{**ts, "initial_state": state}, **c.options, inplace_final_state=True)
    assert ht is state
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ht_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no backward"):
        fn(**{**ts, "q": ts["q"].clone().requires_grad_()}, **c.options, inplace_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        fn(**{**ts, "initial_state": None}, **c.options, inplace_final_state=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(ts: dict[str, Any]) -> Any:
        # the mutating custom op is functionalised by torch.compile and still writes the caller's state
        return fn(**ts, **c.options, inplace_final_state=True)

    state = ts["initial_state"].clone()
    with torch.no_grad():
        o, _ = decode({**ts, "initial_state": state})
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ht_ref, rtol=0, atol=0)


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that runs every op as it is: with one active, a call takes the custom ops through the
    dispatcher instead of calling their implementations eagerly."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", op_params())
def test_eager_and_dispatched_calls_agree(op: OpDef) -> None:
    """An eager call runs the custom ops' implementations itself (no dispatcher, no autograd.Function without a
    backward); under a dispatch mode it goes through the ops. Both give the same bits, forward and gradients, and
    the in-place decode call bumps the state's version either way (autograd's check on saved tensors)."""
    c = Call(op, first_case(op, lambda c: "seqlens" not in c.params), seed=8)
    results = []
    for mode in (None, _PassThrough):
        ts = tensors(c, "float32")
        with mode() if mode else contextlib.nullcontext():
            outs = _run(c, ts)
            with torch.no_grad():
                plain = _run(c, {n: t.detach() for n, t in ts.items()})
            _loss(outs, cotangents(c)).backward()
        results.append([*outs, *plain, *(t.grad for t in ts.values())])
    for eager, dispatched in zip(*results):
        torch.testing.assert_close(eager, dispatched, rtol=0, atol=0)
    if "inplace_final_state" not in op.params:
        return
    for mode in (None, _PassThrough):
        ts = tensors(c, "float32", requires_grad=False)
        with mode() if mode else contextlib.nullcontext():
            version = ts["initial_state"]._version
            getattr(rt, op.name)(**ts, **c.options, inplace_final_state=True)
        assert ts["initial_state"]._version > version, mode


@pytest.mark.parametrize("op", op_params())
def test_validation_errors_are_the_cores(op: OpDef) -> None:
    """The core's errors come through unchanged, and what torch's dispatcher would report its own way (a bad static
    option, a non-tensor, tensors on mixed devices) gets the core's exception naming the argument."""
    c = Call(op, first_case(op), seed=8)
    ts = tensors(c, "float32", requires_grad=False)
    fn = getattr(rt, op.name)
    with pytest.raises(ValueError, match=r"k must have shape"):
        fn(**{**ts, "k": ts["k"][:, :1]}, **c.options)
    if "scale" in op.takes:
        for bad in ("abc", float("nan")):
            with pytest.raises(ValueError, match=r"scale must be"):
                fn(**ts, **c.options, scale=bad)
    if "chunk_size" in op.takes:
        for bad in (*(() if picks_chunk_size(op) else (None,)), 64.0, 8):
            with pytest.raises(ValueError, match=r"chunk_size must be one of"):
                fn(**ts, **{**c.options, "chunk_size": bad})
    for bad in (ts["q"].numpy(), ts["q"].tolist()):
        with pytest.raises(TypeError, match=r"q must be a torch.Tensor"):
            fn(**{**ts, "q": bad}, **c.options)
    with pytest.raises(TypeError, match=r"one device.*'k': 'meta'"):
        fn(**{**ts, "k": ts["k"].to("meta")}, **c.options)


@pytest.mark.parametrize("op", op_params())
def test_compile_fullgraph_cpu(op: OpDef) -> None:
    """Dynamo traces the autograd.Function and both custom ops without a graph break (aot_eager: no C++ build)."""
    c = Call(op, rich_case(op), seed=9)
    cts = cotangents(c)

    def step(ts: dict[str, Any]) -> Any:
        return _loss(_run(c, ts), cts)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ts_e, ts_c = tensors(c, "float32"), tensors(c, "float32")
    step(ts_e).backward()
    compiled(ts_c).backward()
    for n in ts_e:
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=0, atol=0)


def _opcheck_all(c: Call, dtype: str, device: str) -> None:
    """torch.library.opcheck of the op's custom ops (the forward with every output asked for, the backward on its
    workspace, the in-place decode op where the op has one)."""
    import rawdelta.adapters.torch as adapter

    entry = adapter._OPS[c.op.name]  # noqa: SLF001 - the test inspects the registered custom ops
    spec = entry.spec
    a = {**tensors(c, dtype, device, requires_grad=False), "cu_seqlens": cu_seqlens(c, device)}
    statics = {o.name: c.options.get(o.name, o.default) for o in c.op.adapter_options}
    statics["output_final_state"] = True
    # for_backward: the forward whose workspace the backward takes
    fwd = tuple(a.get(n) for n in spec.tensors) + tuple(statics[n] for n in spec.statics) + (True,)
    ops = torch.ops.rawdelta
    workspace = getattr(ops, f"{c.op.name}_fwd").default(*fwd)[-1]
    cts = tuple(x.to(a["v"].dtype) if i == 0 else x for i, x in enumerate(cotangents(c, device)))
    bwd = (*cts, workspace, *(a.get(n) for n in spec.tensors), *(statics[n] for n in spec.bwd_statics))
    torch.library.opcheck(getattr(ops, f"{c.op.name}_fwd").default, fwd)
    torch.library.opcheck(getattr(ops, f"{c.op.name}_bwd").default, bwd)
    if entry.inplace is not None and a.get("initial_state") is not None:
        inplace = [a.get(n) for n in spec.tensors] + [statics[n] for n in spec.bwd_statics]
        i = spec.tensors.index("initial_state")
        inplace[i] = inplace[i].float().contiguous()
        torch.library.opcheck(getattr(ops, f"{c.op.name}_fwd_inplace").default, tuple(inplace))


@pytest.mark.parametrize(("op", "case"), ADAPTER_CASES)
def test_opcheck_cpu(op: OpDef, case: OpCase) -> None:
    _opcheck_all(Call(op, case, seed=10), "float32", "cpu")


def test_every_registered_op_has_an_entry_point() -> None:
    assert sorted(rt.__all__) == sorted(op.name for op in OPS)


# ----------------------------------------------------------------------------------------------------------------------
# GPU (cuda backend)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("op", "case"), CUDA_ADAPTER_CASES)
def test_gpu_matches_reference(op: OpDef, case: OpCase, dtype: str) -> None:
    _check_against_reference(gpu_call(op, case, 11), dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ops_taking("chunk_size", "cuda"))
def test_gpu_every_chunk_size(op: OpDef, dtype: str) -> None:
    case = first_case(op, lambda c: "seqlens" not in c.params)
    for chunk_size in op.chunk_sizes:
        _check_against_reference(Call(op, case, seed=18, **{**GPU_SHAPE, "T": 150}), dtype, "cuda",
                                 chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("op", op_params(backend="cuda"))
def test_gpu_compile_fullgraph_forward_backward(op: OpDef) -> None:
    c = gpu_call(op, rich_case(op), 12)
    cts = cotangents(c, "cuda")

    def step(ts: dict[str, Any]) -> Any:
        return _loss(_run(c, ts, "cuda"), cts)

    compiled = torch.compile(step, fullgraph=True)
    ts_e, ts_c = tensors(c, "bfloat16", "cuda"), tensors(c, "bfloat16", "cuda")
    step(ts_e).backward()
    compiled(ts_c).backward()
    for n in ts_e:
        # Same kernels on the same inputs; only the compiled elementwise glue around them may round differently.
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("op", op_params(backend="cuda"))
def test_gpu_cuda_graph_capture_and_replay(op: OpDef) -> None:
    case = first_case(op, lambda c: "seqlens" not in c.params)
    c, new = gpu_call(op, case, 13), gpu_call(op, case, 14)
    static = tensors(c, "bfloat16", "cuda")
    cts = cotangents(c, "cuda")

    def step(ts: dict[str, Any]) -> tuple[Any, ...]:
        outs = _run(c, ts, "cuda")
        grads = torch.autograd.grad(_loss(outs, cts), list(ts.values()))
        return (*outs, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles and loads the kernels, warms the allocator
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)
    fresh = tensors(new, "bfloat16", "cuda")
    with torch.no_grad():
        for n, t in static.items():
            t.copy_(fresh[n])
    graph.replay()
    torch.cuda.synchronize()
    eager = step(fresh)
    for i, (a, b) in enumerate(zip(captured, eager)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"output {i} differs after replay")


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "case"), CUDA_ADAPTER_CASES)
def test_gpu_opcheck(op: OpDef, case: OpCase) -> None:
    _opcheck_all(gpu_call(op, case, 15), "float32", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", op_params(backend="cuda"))
def test_gpu_runs_on_current_stream_with_torch_allocator(op: OpDef) -> None:
    """Work queued on a side stream before the call is seen by it, and CuPy's own pool stays unused."""
    import cupy

    c = gpu_call(op, first_case(op), 16)
    ref = tensors(c, "float32", "cuda", requires_grad=False)
    want = _run(c, ref, "cuda")
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool()
    used_before = pool.used_bytes()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ts = {n: torch.zeros_like(t) for n, t in ref.items()}
        # If the op launched anywhere but `s`, it would read the zeros still being overwritten here.
        torch.cuda._sleep(50_000_000)
        for n, t in ts.items():
            t.copy_(ref[n])
        got = _run(c, ts, "cuda")
    s.synchronize()
    assert pool.used_bytes() == used_before, "an allocation bypassed torch's caching allocator"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("op", op_params(backend="cuda"))
def test_gpu_backward_on_side_stream(op: OpDef) -> None:
    c = gpu_call(op, rich_case(op), 17)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        _check_against_reference(c, "float32", "cuda")
    s.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ops_without("cuda"))
def test_gpu_op_without_cuda_kernels_refuses(op: OpDef) -> None:
    """CUDA tensors run the cuda backend; an op without cuda kernels refuses them with the core's error."""
    from rawdelta.errors import UnsupportedConfigError

    c = gpu_call(op, first_case(op), 19)
    with pytest.raises(UnsupportedConfigError, match=rf"{op.name} has no 'cuda' backend"):
        _run(c, tensors(c, "float32", "cuda"), "cuda")
