"""rawdelta.torch: autograd, custom ops, torch.compile, CUDA graphs, streams and the torch allocator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rawdelta  # noqa: E402
import rawdelta.torch as rt  # noqa: E402
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

TORCH_OPS = torch.ops.rawdelta
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
QKV = ("q", "k", "v")
OP_NAME = {"recurrent": "fused_recurrent_gated_delta_rule", "chunk": "chunk_gated_delta_rule"}
# The tensor arguments of each op's custom ops, in schema order.
OP_TENSORS = {"recurrent": ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "cu_seqlens_cpu", "gk", "gv",
                            "A_log", "dt_bias"),
              "chunk": ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "cu_seqlens_cpu", "A_log",
                        "dt_bias")}


def _call(op: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """rawdelta.torch's `op` (the chunk op with CHUNK_SIZE unless given); traceable by torch.compile."""
    if op == "chunk":
        return rt.chunk_gated_delta_rule(*args, **{"chunk_size": CHUNK_SIZE, **kwargs})
    return rt.fused_recurrent_gated_delta_rule(*args, **kwargs)


def _core(op: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """The core op on numpy arrays (the numpy backend)."""
    fn = rawdelta.chunk_gated_delta_rule if op == "chunk" else rawdelta.fused_recurrent_gated_delta_rule
    return fn(*args, **kwargs)


def _tensors(case: Case, dtype: str, device: str = "cpu", requires_grad: bool = True) -> dict[str, Any]:
    """q, k, v in `dtype`; gates, beta, state and A_log/dt_bias float32 (float64 with float64 q)."""
    side = torch.float64 if dtype == "float64" else torch.float32
    out = {}
    for n, a in case.arrays.items():
        t = torch.from_numpy(a).to(device=device, dtype=TORCH_DTYPES[dtype] if n in QKV else side)
        out[n] = t.requires_grad_(requires_grad)
    return out


def _cu(case: Case, device: str = "cpu") -> Any:
    return None if case.cu_seqlens is None else torch.from_numpy(case.cu_seqlens).to(device)


def _host64(t: Any) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _loss(o: Any, ht: Any, do: Any, dht: Any) -> Any:
    return (o.float() * do).sum() + (ht * dht).sum()


def _run_and_grad(case: Case, dtype: str, device: str = "cpu", op: str = "recurrent",
                  **kwargs: Any) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    ts = _tensors(case, dtype, device)
    o, ht = _call(op, **ts, cu_seqlens=_cu(case, device), output_final_state=True, **case.flags, **kwargs)
    do = torch.from_numpy(case.do).to(device, torch.float32)
    dht = torch.from_numpy(case.dht).to(device, torch.float32)
    _loss(o, ht, do, dht).backward()
    return o, ht, ts, {n: t.grad for n, t in ts.items()}


def _check_against_reference(case: Case, dtype: str, device: str = "cpu", op: str = "recurrent",
                             **kwargs: Any) -> None:
    o, ht, ts, grads = _run_and_grad(case, dtype, device, op, **kwargs)
    assert o.dtype == TORCH_DTYPES[dtype] and o.device.type == device
    assert ht.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    # The reference sees exactly the (rounded) inputs the op saw.
    ro, rht, rgrads = reference({n: _host64(t) for n, t in ts.items()}, case.cu_seqlens, case.flags,
                                case.do, case.dht)
    assert_close("o", ro, _host64(o), dtype=dtype)
    assert_close("ht", rht, _host64(ht), dtype=dtype)
    for n, g in grads.items():
        assert g is not None and g.dtype == ts[n].dtype, n
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(g), dtype=dtype)


def _ids(params: list[tuple[str, str]]) -> list[str]:
    return [f"{op}-{name}" for op, name in params]


ALL_CASES = op_cases()
# The default case of each op, and the opcheck cases (each input kind of the op, varlen).
G_BETA = op_cases(["g_beta"])
OPCHECK_CASES = op_cases(["g_beta", "gk_gv_beta_per_v", "varlen_empty_sequence"])


# ----------------------------------------------------------------------------------------------------------------------
# CPU (numpy backend): runs in CI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "name"), ALL_CASES, ids=_ids(ALL_CASES))
def test_gradcheck_float64(op: str, name: str) -> None:
    case = make_case(name, op=op)
    names = list(case.arrays)
    ts = _tensors(case, "float64")
    cu = _cu(case)

    def f(*xs: Any) -> tuple[Any, Any]:
        # Both outputs are checked, so the final-state cotangent (dht) is covered too.
        return _call(op, **dict(zip(names, xs)), cu_seqlens=cu, output_final_state=True, **case.flags)

    assert torch.autograd.gradcheck(f, tuple(ts[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("op", "name"), ALL_CASES, ids=_ids(ALL_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_matches_reference(op: str, name: str, dtype: str) -> None:
    _check_against_reference(make_case(name, seed=1, op=op), dtype, op=op)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes(chunk_size: int) -> None:
    """Every chunk size the op takes, on a T that leaves a partial last chunk for each."""
    case = make_case("crosses_chunk", seed=2, op="chunk", T=70)
    _check_against_reference(case, "float64", op="chunk", chunk_size=chunk_size)


@pytest.mark.parametrize("op", OPS)
def test_forward_matches_naive_reference(op: str) -> None:
    case = make_case("crosses_chunk", seed=2, op=op)
    ts = _tensors(case, "float32", requires_grad=False)
    o, ht = _call(op, **ts, output_final_state=True)
    ro, rht = rawdelta.naive_recurrent_gated_delta_rule(**{n: t.numpy() for n, t in ts.items()},
                                                        output_final_state=True)
    assert_close("o", ro, o.numpy(), dtype="float32")
    assert_close("ht", rht, ht.numpy(), dtype="float32")
    o2, ht2 = _call(op, **ts)
    assert ht2 is None
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_positional_arguments_and_defaults_match_core(op: str) -> None:
    """Same positional order and defaults (the chunk op's chunk_size=64 included) as the core op."""
    case = make_case("crosses_chunk", seed=3, op=op, T=70)
    a = {n: torch.from_numpy(x).float() for n, x in case.arrays.items()}
    fn = getattr(rt, OP_NAME[op])
    o, ht = fn(a["q"], a["k"], a["v"], a["g"], a["beta"], 0.7, a["initial_state"], True)
    ro, rht = _core(op, *(a[n].numpy() for n in ("q", "k", "v", "g", "beta")), 0.7, a["initial_state"].numpy(), True)
    np.testing.assert_array_equal(o.numpy(), ro)
    np.testing.assert_array_equal(ht.numpy(), rht)


def test_public_names_and_signatures_match_core() -> None:
    import inspect

    for name in OP_NAME.values():
        core = inspect.signature(getattr(rawdelta, name)).parameters
        ours = inspect.signature(getattr(rt, name)).parameters
        want = [(p.name, p.kind, p.default) for p in core.values() if p.name not in ("backend", "stream")]
        assert [(p.name, p.kind, p.default) for p in ours.values()] == want, name
        assert name in rt.__all__


@pytest.mark.parametrize("op", OPS)
def test_gradient_from_output_only_and_state_only(op: str) -> None:
    """An unused output reaches the backward as None (o) or no dht at all (final state)."""
    case = make_case("crosses_chunk", seed=4, op=op)
    for use in ("o", "ht"):
        ts = _tensors(case, "float64")
        o, ht = _call(op, **ts, output_final_state=True)
        do = torch.from_numpy(case.do) if use == "o" else torch.zeros_like(o)
        dht = torch.from_numpy(case.dht) if use == "ht" else torch.zeros_like(ht)
        (o * do).sum().backward() if use == "o" else (ht * dht).sum().backward()
        _, _, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, do.numpy(), dht.numpy())
        for n, t in ts.items():
            assert_close(GRAD_LABEL[n], rgrads[n], _host64(t.grad), dtype="float64")


@pytest.mark.parametrize("op", OPS)
def test_no_final_state_has_no_state_gradient_input(op: str) -> None:
    case = make_case("g_beta", seed=5, op=op)
    ts = _tensors(case, "float64")
    o, ht = _call(op, **ts)
    assert ht is None
    (o * torch.from_numpy(case.do)).sum().backward()
    _, _, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, case.do, None)
    for n, t in ts.items():
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(t.grad), dtype="float64")


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op: str) -> None:
    case = make_case("g_beta", seed=6, op=op)
    ts = _tensors(case, "float32", requires_grad=False)
    # Same values, transposed storage.
    q_nc = ts["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous()
    o, _ = _call(op, **{**ts, "q": q_nc})
    o_ref, _ = _call(op, **ts)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)


def test_inplace_final_state() -> None:
    case = make_case("g_beta", seed=7)
    ts = _tensors(case, "float32", requires_grad=False)
    o_ref, ht_ref = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
    state = ts["initial_state"].clone()
    o, ht = rt.fused_recurrent_gated_delta_rule(**{**ts, "initial_state": state}, inplace_final_state=True)
    assert ht is state
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ht_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no backward"):
        rt.fused_recurrent_gated_delta_rule(**{**ts, "q": ts["q"].clone().requires_grad_()},
                                            inplace_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        rt.fused_recurrent_gated_delta_rule(**{**ts, "initial_state": None}, inplace_final_state=True)


def test_inplace_final_state_compiles() -> None:
    """The mutating custom op is functionalised by torch.compile and still writes the caller's state."""
    case = make_case("g_beta", seed=7)
    ts = _tensors(case, "float32", requires_grad=False)
    o_ref, ht_ref = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
    state = ts["initial_state"].clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(q: Any, k: Any, v: Any, g: Any, beta: Any, st: Any) -> Any:
        return rt.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=st, inplace_final_state=True)

    with torch.no_grad():
        o, _ = decode(ts["q"], ts["k"], ts["v"], ts["g"], ts["beta"], state)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ht_ref, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_validation_errors_pass_through(op: str) -> None:
    case = make_case("g_beta", op=op)
    ts = _tensors(case, "float32", requires_grad=False)
    with pytest.raises(ValueError, match=r"k must have shape"):
        _call(op, **{**ts, "k": ts["k"][:, :2]})


def test_chunk_op_errors() -> None:
    case = make_case("g_beta", op="chunk")
    ts = _tensors(case, "float32", requires_grad=False)
    with pytest.raises(ValueError, match=r"chunk_size must be one of \(16, 32, 64\), got 8"):
        rt.chunk_gated_delta_rule(**ts, chunk_size=8)
    beta_per_v = ts["beta"][..., None].expand(*ts["v"].shape).contiguous()
    with pytest.raises(NotImplementedError, match="per value dimension"):
        rt.chunk_gated_delta_rule(**{**ts, "beta": beta_per_v})
    with pytest.raises(TypeError, match="gk"):
        rt.chunk_gated_delta_rule(**ts, gk=ts["q"])


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_cpu(op: str) -> None:
    """Dynamo traces the autograd.Function and both custom ops without a graph break (aot_eager: no C++ build)."""
    case = make_case("l2norm_sigmoid_gate_in_kernel", seed=8, op=op)
    flags = case.flags

    def step(ts: dict[str, Any], do: Any, dht: Any) -> Any:
        o, ht = _call(op, **ts, output_final_state=True, **flags)
        return _loss(o, ht, do, dht)

    do, dht = torch.from_numpy(case.do).float(), torch.from_numpy(case.dht).float()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ts_e, ts_c = _tensors(case, "float32"), _tensors(case, "float32")
    step(ts_e, do, dht).backward()
    compiled(ts_c, do, dht).backward()
    for n in ts_e:
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=0, atol=0)


def _op_args(case: Case, dtype: str, device: str, op: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Positional arguments of `op`'s custom ops ``_fwd`` (output_final_state=True) and ``_bwd``."""
    ts = _tensors(case, dtype, device, requires_grad=False)
    a = {**ts, "cu_seqlens": _cu(case, device)}
    f = case.flags
    flags = (f["use_qk_l2norm_in_kernel"], f["use_gate_in_kernel"], f["use_beta_sigmoid_in_kernel"],
             f["allow_neg_eigval"])
    extra = (CHUNK_SIZE,) if op == "chunk" else ()
    tensors = tuple(a.get(n) for n in OP_TENSORS[op])
    fwd = (*tensors, None, True, *flags, *extra)
    do = torch.from_numpy(case.do).to(device, TORCH_DTYPES[dtype])
    dht = torch.from_numpy(case.dht).to(device, torch.float32)
    workspace = getattr(TORCH_OPS, OP_NAME[op] + "_fwd").default(*fwd)[2]  # the forward's factors for the backward
    bwd = (do, dht, workspace, *tensors, None, *flags, *extra)
    return fwd, bwd


def _opcheck_all(case: Case, dtype: str, device: str, op: str) -> None:
    fwd, bwd = _op_args(case, dtype, device, op)
    torch.library.opcheck(getattr(TORCH_OPS, OP_NAME[op] + "_fwd").default, fwd)
    torch.library.opcheck(getattr(TORCH_OPS, OP_NAME[op] + "_bwd").default, bwd)
    if op == "recurrent":
        inplace = list(fwd)
        del inplace[13]  # no output_final_state argument
        inplace[5] = inplace[5].float().contiguous()
        torch.library.opcheck(TORCH_OPS.fused_recurrent_gated_delta_rule_fwd_inplace.default, tuple(inplace))


@pytest.mark.parametrize(("op", "name"), OPCHECK_CASES, ids=_ids(OPCHECK_CASES))
def test_opcheck_cpu(op: str, name: str) -> None:
    _opcheck_all(make_case(name, seed=9, op=op), "float32", "cpu", op)


# ----------------------------------------------------------------------------------------------------------------------
# GPU (cuda backend)
# ----------------------------------------------------------------------------------------------------------------------

# Big enough to exercise the kernels' tiling (T crosses chunks of 16 and 32), small enough to stay fast.
GPU_SHAPE = {"B": 2, "T": 37, "H": 2, "K": 64, "V": 32}
# The CPU cases at GPU_SHAPE; the crossing cases are left out, GPU_SHAPE crosses chunks anyway.
GPU_CASES = [(op, n) for op, n in ALL_CASES if "crosses_chunk" not in n]


def _gpu_case(name: str = "g_beta", seed: int = 0, op: str = "recurrent") -> Case:
    if name.startswith("varlen"):
        return make_case(name, seed=seed, op=op, **{**GPU_SHAPE, "B": 1, "seqlens": [17, 0, 40, 1]})
    if name == "grouped_heads":
        return make_case(name, seed=seed, op=op, **GPU_SHAPE, HV=4)
    return make_case(name, seed=seed, op=op, **GPU_SHAPE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("op", "name"), GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_matches_reference(op: str, name: str, dtype: str) -> None:
    _check_against_reference(_gpu_case(name, seed=11, op=op), dtype, "cuda", op)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_gpu_chunk_sizes(chunk_size: int, dtype: str) -> None:
    case = make_case("g_beta", seed=18, op="chunk", **{**GPU_SHAPE, "T": 150})
    _check_against_reference(case, dtype, "cuda", "chunk", chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_compile_fullgraph_forward_backward(op: str) -> None:
    case = _gpu_case("l2norm_sigmoid_gate_in_kernel", seed=12, op=op)
    do = torch.from_numpy(case.do).cuda().float()
    dht = torch.from_numpy(case.dht).cuda().float()

    def step(ts: dict[str, Any]) -> Any:
        o, ht = _call(op, **ts, output_final_state=True, **case.flags)
        return _loss(o, ht, do, dht)

    compiled = torch.compile(step, fullgraph=True)
    ts_e, ts_c = _tensors(case, "bfloat16", "cuda"), _tensors(case, "bfloat16", "cuda")
    step(ts_e).backward()
    compiled(ts_c).backward()
    for n in ts_e:
        # Same kernels on the same inputs; only the compiled elementwise glue around them may round differently.
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_cuda_graph_capture_and_replay(op: str) -> None:
    case = _gpu_case("g_beta", seed=13, op=op)
    new = _gpu_case("g_beta", seed=14, op=op)
    static = _tensors(case, "bfloat16", "cuda")
    do = torch.from_numpy(case.do).cuda().float()
    dht = torch.from_numpy(case.dht).cuda().float()

    def step(ts: dict[str, Any]) -> tuple[Any, ...]:
        o, ht = _call(op, **ts, output_final_state=True)
        grads = torch.autograd.grad(_loss(o, ht, do, dht), list(ts.values()))
        return (o, ht, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles and loads the kernels, warms the allocator
            step(static)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)

    fresh = _tensors(new, "bfloat16", "cuda")
    with torch.no_grad():
        for n, t in static.items():
            t.copy_(fresh[n])
    graph.replay()
    torch.cuda.synchronize()
    eager = step(fresh)
    for i, (c, e) in enumerate(zip(captured, eager)):
        torch.testing.assert_close(c, e, rtol=0, atol=0, msg=f"output {i} differs after replay")


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize(("dtype", "chunk_size"), [("float32", 16), ("bfloat16", 64)])
def test_gpu_chunk_backward_takes_the_forward_factors(dtype: str, chunk_size: int, aligned: bool,
                                                      monkeypatch: Any) -> None:
    """The chunked op's backward takes the per-chunk factors from the workspace its forward op returned: prepare
    runs once per step, and the gradients are those of a backward that recomputes the factors, bit for bit. Where
    q, k and v are not 16-byte aligned, bf16 chunks of 64 miss the Hopper kernels the workspace was sized for: it
    stays unused and the backward recomputes the factors."""
    import rawdelta.adapters.torch as adapter

    case = _gpu_case("l2norm_sigmoid_gate_in_kernel", seed=19, op="chunk")
    do = torch.from_numpy(case.do).cuda().float()
    dht = torch.from_numpy(case.dht).cuda().float()

    def step() -> tuple[Any, ...]:
        ts = _tensors(case, dtype, "cuda", requires_grad=False)
        if not aligned:  # one element past an allocation's start
            for n in QKV:
                t = torch.empty(ts[n].numel() + 1, dtype=ts[n].dtype, device="cuda")[1:].view(ts[n].shape)
                ts[n] = t.copy_(ts[n])
        for t in ts.values():
            t.requires_grad_()
        o, ht = _call("chunk", **ts, output_final_state=True, chunk_size=chunk_size, **case.flags)
        grads = torch.autograd.grad(_loss(o, ht, do, dht), list(ts.values()))
        return (o, ht, *grads)

    seen = count_prepare_launches(monkeypatch)
    kept = step()
    hopper_layout = dtype == "bfloat16" and chunk_size == 64 and torch.cuda.get_device_capability() == (9, 0)
    assert len(seen) == (1 if aligned or not hopper_layout else 2)
    seen.clear()
    monkeypatch.setattr(adapter, "workspace_nbytes", lambda *a: 0)  # no workspace: the backward recomputes
    recomputed = step()
    assert len(seen) == 2
    for i, (a, b) in enumerate(zip(kept, recomputed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"output {i} differs")


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "name"), OPCHECK_CASES, ids=_ids(OPCHECK_CASES))
def test_gpu_opcheck(op: str, name: str) -> None:
    _opcheck_all(_gpu_case(name, seed=15, op=op), "float32", "cuda", op)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_runs_on_current_stream_with_torch_allocator(op: str) -> None:
    """Work queued on a side stream before the call is seen by it, and CuPy's own pool stays unused."""
    import cupy

    case = _gpu_case("g_beta", seed=16, op=op)
    ref = _tensors(case, "float32", "cuda", requires_grad=False)
    o_ref, ht_ref = _call(op, **ref, output_final_state=True)
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
        o, ht = _call(op, **ts, output_final_state=True)
    s.synchronize()
    assert pool.used_bytes() == used_before, "an allocation bypassed torch's caching allocator"
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(ht, ht_ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_backward_on_side_stream(op: str) -> None:
    case = _gpu_case(RICH_CASE[op], seed=17, op=op)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        o, ht, ts, grads = _run_and_grad(case, "float32", "cuda", op)
    s.synchronize()
    ro, rht, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, case.do, case.dht)
    assert_close("o", ro, _host64(o), dtype="float32")
    for n, g in grads.items():
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(g), dtype="float32")
