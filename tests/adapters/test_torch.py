"""rawdelta.torch: autograd, custom ops, torch.compile, CUDA graphs, streams and the torch allocator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rawdelta  # noqa: E402
import rawdelta.torch as rt  # noqa: E402
from rawdelta.testing import assert_close  # noqa: E402

from ._cases import CASES, GRAD_LABEL, Case, make_case, reference  # noqa: E402

OPS = torch.ops.rawdelta
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
QKV = ("q", "k", "v")


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


def _run_and_grad(case: Case, dtype: str, device: str = "cpu", op: Any = None) -> tuple[Any, Any, dict[str, Any],
                                                                                      dict[str, Any]]:
    op = op or rt.fused_recurrent_gated_delta_rule
    ts = _tensors(case, dtype, device)
    o, ht = op(**ts, cu_seqlens=_cu(case, device), output_final_state=True, **case.flags)
    do = torch.from_numpy(case.do).to(device, torch.float32)
    dht = torch.from_numpy(case.dht).to(device, torch.float32)
    _loss(o, ht, do, dht).backward()
    return o, ht, ts, {n: t.grad for n, t in ts.items()}


def _check_against_reference(case: Case, dtype: str, device: str = "cpu") -> None:
    o, ht, ts, grads = _run_and_grad(case, dtype, device)
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


# ----------------------------------------------------------------------------------------------------------------------
# CPU (numpy backend): runs in CI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name: str) -> None:
    case = make_case(name)
    names = list(case.arrays)
    ts = _tensors(case, "float64")
    cu = _cu(case)

    def f(*xs: Any) -> tuple[Any, Any]:
        # Both outputs are checked, so the final-state cotangent (dht) is covered too.
        return rt.fused_recurrent_gated_delta_rule(**dict(zip(names, xs)), cu_seqlens=cu, output_final_state=True,
                                                   **case.flags)

    assert torch.autograd.gradcheck(f, tuple(ts[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_matches_reference(name: str, dtype: str) -> None:
    _check_against_reference(make_case(name, seed=1), dtype)


def test_forward_matches_naive_reference() -> None:
    case = make_case("g_beta", seed=2)
    ts = _tensors(case, "float32", requires_grad=False)
    o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
    ro, rht = rawdelta.naive_recurrent_gated_delta_rule(**{n: t.numpy() for n, t in ts.items()},
                                                        output_final_state=True)
    assert_close("o", ro, o.numpy(), dtype="float32")
    assert_close("ht", rht, ht.numpy(), dtype="float32")
    o2, ht2 = rt.fused_recurrent_gated_delta_rule(**ts)
    assert ht2 is None
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_positional_arguments_and_defaults_match_core() -> None:
    case = make_case("g_beta", seed=3)
    a = {n: torch.from_numpy(x).float() for n, x in case.arrays.items()}
    o, ht = rt.fused_recurrent_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], 0.7, a["initial_state"],
                                                True)
    ro, rht = rawdelta.fused_recurrent_gated_delta_rule(*(a[n].numpy() for n in ("q", "k", "v", "g", "beta")), 0.7,
                                                        a["initial_state"].numpy(), True)
    np.testing.assert_array_equal(o.numpy(), ro)
    np.testing.assert_array_equal(ht.numpy(), rht)


def test_gradient_from_output_only_and_state_only() -> None:
    """An unused output reaches the backward as None (o) or no dht at all (final state)."""
    case = make_case("g_beta", seed=4)
    for use in ("o", "ht"):
        ts = _tensors(case, "float64")
        o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
        do = torch.from_numpy(case.do) if use == "o" else torch.zeros_like(o)
        dht = torch.from_numpy(case.dht) if use == "ht" else torch.zeros_like(ht)
        (o * do).sum().backward() if use == "o" else (ht * dht).sum().backward()
        _, _, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, do.numpy(), dht.numpy())
        for n, t in ts.items():
            assert_close(GRAD_LABEL[n], rgrads[n], _host64(t.grad), dtype="float64")


def test_no_final_state_has_no_state_gradient_input() -> None:
    case = make_case("g_beta", seed=5)
    ts = _tensors(case, "float64")
    o, ht = rt.fused_recurrent_gated_delta_rule(**ts)
    assert ht is None
    (o * torch.from_numpy(case.do)).sum().backward()
    _, _, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, case.do, None)
    for n, t in ts.items():
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(t.grad), dtype="float64")


def test_non_contiguous_inputs() -> None:
    case = make_case("g_beta", seed=6)
    ts = _tensors(case, "float32", requires_grad=False)
    # Same values, transposed storage.
    q_nc = ts["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous()
    o, _ = rt.fused_recurrent_gated_delta_rule(**{**ts, "q": q_nc})
    o_ref, _ = rt.fused_recurrent_gated_delta_rule(**ts)
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


def test_validation_errors_pass_through() -> None:
    case = make_case("g_beta")
    ts = _tensors(case, "float32", requires_grad=False)
    with pytest.raises(ValueError, match=r"k must have shape"):
        rt.fused_recurrent_gated_delta_rule(**{**ts, "k": ts["k"][:, :2]})


def test_compile_fullgraph_cpu() -> None:
    """Dynamo traces the autograd.Function and both custom ops without a graph break (aot_eager: no C++ build)."""
    case = make_case("l2norm_sigmoid_gate_in_kernel", seed=8)
    flags = case.flags

    def step(ts: dict[str, Any], do: Any, dht: Any) -> Any:
        o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True, **flags)
        return _loss(o, ht, do, dht)

    do, dht = torch.from_numpy(case.do).float(), torch.from_numpy(case.dht).float()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ts_e, ts_c = _tensors(case, "float32"), _tensors(case, "float32")
    step(ts_e, do, dht).backward()
    compiled(ts_c, do, dht).backward()
    for n in ts_e:
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=0, atol=0)


def _op_args(case: Case, dtype: str, device: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    ts = _tensors(case, dtype, device, requires_grad=False)
    a = {n: ts.get(n) for n in ("q", "k", "v", "g", "beta", "initial_state", "gk", "gv", "A_log", "dt_bias")}
    f = case.flags
    flags = (f["use_qk_l2norm_in_kernel"], f["use_gate_in_kernel"], f["use_beta_sigmoid_in_kernel"],
             f["allow_neg_eigval"])
    tensors = (a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"], _cu(case, device), None, a["gk"],
               a["gv"], a["A_log"], a["dt_bias"])
    fwd = (*tensors, None, True, *flags)
    do = torch.from_numpy(case.do).to(device, TORCH_DTYPES[dtype])
    dht = torch.from_numpy(case.dht).to(device, torch.float32)
    bwd = (do, dht, *tensors, None, *flags)
    return fwd, bwd


def _opcheck_all(case: Case, dtype: str, device: str) -> None:
    fwd, bwd = _op_args(case, dtype, device)
    torch.library.opcheck(OPS.fused_recurrent_gated_delta_rule_fwd.default, fwd)
    torch.library.opcheck(OPS.fused_recurrent_gated_delta_rule_bwd.default, bwd)
    inplace = list(fwd)
    del inplace[13]  # no output_final_state argument
    inplace[5] = inplace[5].float().contiguous()
    torch.library.opcheck(OPS.fused_recurrent_gated_delta_rule_fwd_inplace.default, tuple(inplace))


@pytest.mark.parametrize("name", ["g_beta", "gk_gv_beta_per_v", "varlen_empty_sequence"])
def test_opcheck_cpu(name: str) -> None:
    _opcheck_all(make_case(name, seed=9), "float32", "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# GPU (cuda backend)
# ----------------------------------------------------------------------------------------------------------------------

# Big enough to exercise the kernels' tiling, small enough to stay fast.
GPU_SHAPE = {"B": 2, "T": 37, "H": 2, "K": 64, "V": 32}


def _gpu_case(name: str = "g_beta", seed: int = 0) -> Case:
    if name == "varlen_empty_sequence":
        return make_case(name, seed=seed, **{**GPU_SHAPE, "B": 1, "seqlens": [17, 0, 40, 1]})
    if name == "grouped_heads":
        return make_case(name, seed=seed, **GPU_SHAPE, HV=4)
    return make_case(name, seed=seed, **GPU_SHAPE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_reference(name: str, dtype: str) -> None:
    _check_against_reference(_gpu_case(name, seed=11), dtype, "cuda")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_forward_backward() -> None:
    case = _gpu_case("l2norm_sigmoid_gate_in_kernel", seed=12)
    do = torch.from_numpy(case.do).cuda().float()
    dht = torch.from_numpy(case.dht).cuda().float()

    def step(ts: dict[str, Any]) -> Any:
        o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True, **case.flags)
        return _loss(o, ht, do, dht)

    compiled = torch.compile(step, fullgraph=True)
    ts_e, ts_c = _tensors(case, "bfloat16", "cuda"), _tensors(case, "bfloat16", "cuda")
    step(ts_e).backward()
    compiled(ts_c).backward()
    for n in ts_e:
        # Same kernels on the same inputs; only the compiled elementwise glue around them may round differently.
        torch.testing.assert_close(ts_c[n].grad, ts_e[n].grad, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay() -> None:
    case = _gpu_case("g_beta", seed=13)
    new = _gpu_case("g_beta", seed=14)
    static = _tensors(case, "bfloat16", "cuda")
    do = torch.from_numpy(case.do).cuda().float()
    dht = torch.from_numpy(case.dht).cuda().float()

    def step(ts: dict[str, Any]) -> tuple[Any, ...]:
        o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
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
@pytest.mark.parametrize("name", ["g_beta", "gk_gv_beta_per_v", "varlen_empty_sequence"])
def test_gpu_opcheck(name: str) -> None:
    _opcheck_all(_gpu_case(name, seed=15), "float32", "cuda")


@pytest.mark.gpu
def test_gpu_runs_on_current_stream_with_torch_allocator() -> None:
    """Work queued on a side stream before the call is seen by it, and CuPy's own pool stays unused."""
    import cupy

    case = _gpu_case("g_beta", seed=16)
    ref = _tensors(case, "float32", "cuda", requires_grad=False)
    o_ref, ht_ref = rt.fused_recurrent_gated_delta_rule(**ref, output_final_state=True)
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
        o, ht = rt.fused_recurrent_gated_delta_rule(**ts, output_final_state=True)
    s.synchronize()
    assert pool.used_bytes() == used_before, "an allocation bypassed torch's caching allocator"
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(ht, ht_ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_backward_on_side_stream() -> None:
    case = _gpu_case("gk_gv_beta_per_v", seed=17)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        o, ht, ts, grads = _run_and_grad(case, "float32", "cuda")
    s.synchronize()
    ro, rht, rgrads = reference({n: _host64(t) for n, t in ts.items()}, None, case.flags, case.do, case.dht)
    assert_close("o", ro, _host64(o), dtype="float32")
    for n, g in grads.items():
        assert_close(GRAD_LABEL[n], rgrads[n], _host64(g), dtype="float32")
