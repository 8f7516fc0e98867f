"""The ``numba`` backend of the chunked gated delta rule against the float64 recurrent reference.

Every chunked-mode option, forward (o, final state) and every gradient (dh0 and the dht path included);
and the shared Numba chunk stages it runs on, in every gate form and update rule, against the float64
NumPy stages.
``numba_sim`` tests use tiny shapes with T crossing chunks of 16 (the CUDA simulator runs each thread in
Python); ``gpu`` tests run the same kernels on a real GPU with CuPy device arrays and bigger shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.common import chunk_stages
from rawdelta.ops.common.numba_chunk_stages import GATE_FORMS, UPDATE_RULES, NumbaChunkStages
from rawdelta.ops.common.numba_launch import NumbaLauncher
from rawdelta.ops.gated_delta_rule import chunk_gated_delta_rule, naive
from rawdelta.ops.gated_delta_rule.numba_chunk import chunk_tables
from rawdelta.testing import assert_close, gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import CHUNK_OPTIONS, CHUNK_SHAPES, check_backend, make_inputs, make_problem


def test_chunk_tables() -> None:
    chunks, seqs = chunk_tables([(0, 0, 17), (0, 17, 17), (0, 17, 49), (0, 49, 50)], 16)
    np.testing.assert_array_equal(chunks, [[0, 0, 16], [0, 16, 1], [0, 17, 16], [0, 33, 16], [0, 49, 1]])
    np.testing.assert_array_equal(seqs, [[0, 2], [2, 0], [2, 2], [4, 1]])
    chunks, seqs = chunk_tables([], 16)
    assert chunks.shape == (0, 3) and seqs.shape == (0, 2)


@pytest.mark.numba_sim
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in CHUNK_OPTIONS], ids=[o[0] for o in CHUNK_OPTIONS])
def test_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...]) -> None:
    inputs = gated_delta_rule_inputs(2, 20, 1, 4, 3, HV=2, seed=1, **gen)
    check_backend("numba", inputs, drop=drop, mode="chunk", chunk_size=16, **extra)


@pytest.mark.numba_sim
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in CHUNK_SHAPES], ids=[s[0] for s in CHUNK_SHAPES])
def test_shapes(shape: dict[str, Any], use_dht: bool) -> None:
    check_backend("numba", make_inputs(shape, seed=2), use_dht=use_dht, mode="chunk", chunk_size=16)


@pytest.mark.numba_sim
@pytest.mark.parametrize("chunk_size", [32, 64])
def test_chunk_sizes(chunk_size: int) -> None:
    """Full and partial chunks; the in-kernel gate gives steps down to about -40, so a chunk's gate cumsum reaches
    the hundreds (dg and dA_log are tiny there and must not come from cancelling O(1) terms)."""
    inputs = gated_delta_rule_inputs(1, 0, 1, 8, 6, HV=2, seed=3, seqlens=(chunk_size + 5, 7), use_gate_in_kernel=True)
    check_backend("numba", inputs, mode="chunk", chunk_size=chunk_size)


@pytest.mark.numba_sim
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_input_dtypes(dtype: str) -> None:
    inputs = gated_delta_rule_inputs(1, 20, 1, 4, 5, HV=2, dtype=dtype, seed=4, use_qk_l2norm_in_kernel=True)
    check_backend("numba", inputs, mode="chunk", chunk_size=16)


@pytest.mark.numba_sim
def test_non_float32_gates_and_state() -> None:
    """Gates, beta and h0 given in float64 are read as float32 (make_problem casts them for this backend)."""
    inputs = gated_delta_rule_inputs(1, 20, 1, 4, 3, seed=5)
    for n in ("g", "beta", "initial_state"):
        inputs[n] = inputs[n].astype(np.float64)
    check_backend("numba", inputs, mode="chunk", chunk_size=16)


@pytest.mark.numba_sim
def test_forward_only() -> None:
    kw, _, _ = split_op_args(gated_delta_rule_inputs(1, 0, 1, 4, 3, seed=6, seqlens=(18, 0, 3)))
    o_ref, _ = naive.recurrent_forward(make_problem(**kw, backend="numpy"))
    o, ht = chunk_gated_delta_rule(**kw, backend="numba", chunk_size=16)
    assert ht is None
    assert_close("o", o_ref, o, dtype="float32")


def _numpy_stages(x: dict[str, Any], bounds: list[tuple[int, int, int]], group: int, C: int,
                  scale: float) -> dict[str, np.ndarray]:
    """:func:`test_shared_stages`' quantities from the float64 stages of chunk_stages.py, sequence by sequence."""
    x = {n: None if a is None else a.astype(np.float64) for n, a in x.items()}
    qk_shape = x["u"].shape[:3] + x["q"].shape[3:]  # [B, T, HV, K]: per state head
    ref = {"o": np.zeros(x["u"].shape), "ddelta": np.zeros(x["u"].shape), "dg": np.zeros(x["g"].shape),
           "ht": np.zeros(x["h0"].shape), "dh0": np.zeros(x["h0"].shape), "dq": np.zeros(qk_shape),
           "dk": np.zeros(qk_shape)}
    if x["w"] is not None:
        ref["dw"] = np.zeros(qk_shape)
    for n, (b, bos, eos) in enumerate(bounds):
        q, k = (np.repeat(x[name][b, bos:eos], group, axis=1) for name in ("q", "k"))
        u, do, g = x["u"][b, bos:eos], x["do"][b, bos:eos], x["g"][b, bos:eos]
        w = None if x["w"] is None else x["w"][b, bos:eos]
        G = chunk_stages.chunk_local_cumsum(g if g.shape[-1] > 1 else g[..., 0], C)
        h, delta, ref["ht"][n] = chunk_stages.state_pass_fwd(k, u, G, x["h0"][n], C, w)
        ref["o"][b, bos:eos] = chunk_stages.chunk_output(q, k, G, h, delta, scale, C)
        dd_local = chunk_stages.chunk_output_dv_local(q, k, G, do, scale, C)
        dh, ddelta, ref["dh0"][n] = chunk_stages.state_pass_bwd(q, k, G, do, dd_local, x["dht"][n], scale, C, w)
        dq, dk, dG = chunk_stages.chunk_qk_grads(q, k, G, h, dh, delta, do, scale, C)
        ref["ddelta"][b, bos:eos], ref["dq"][b, bos:eos], ref["dk"][b, bos:eos] = ddelta, dq, dk
        ref["dg"][b, bos:eos] = chunk_stages.reverse_chunk_local_cumsum(dG, G, C).reshape(g.shape)
        for c, sl in enumerate(chunk_stages.chunk_slices(eos - bos, C)):
            if w is not None:
                ref["dw"][b, bos:eos][sl] = -np.einsum("hkv,rhv->rhk", h[c], ddelta[sl])
    return ref


@pytest.mark.numba_sim
@pytest.mark.parametrize("resets", [False, True], ids=["", "resets"])
@pytest.mark.parametrize("update_rule", UPDATE_RULES)
@pytest.mark.parametrize("gate_form", GATE_FORMS)
def test_shared_stages(gate_form: str, update_rule: str, resets: bool) -> None:
    """ops/common/numba_chunk_stages.py in every form (GDN runs the scalar gate with the delta rule; GLA will run
    the per-key gate with the plain rule) against chunk_stages.py: forward, the reverse state pass, dq, dk, dw
    and the gate gradient (w and the gate taken as free inputs), over sequences crossing chunks and an empty one;
    with `resets`, gates of -inf and -1e30 at a chunk's first row, inside and at its last row, two in one chunk, in
    one head or (per key) one lane only."""
    rng = np.random.default_rng(9)
    B, T, H, HV, K, V, C, scale = 1, 20, 1, 2, 4, 3, 8, 0.5
    bounds = [(0, 0, 11), (0, 11, 11), (0, 11, 20)]
    N, lanes = len(bounds), K if gate_form == "per_key" else 1

    def randn(*shape: int, std: float = 1.0) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "u": randn(B, T, HV, V),
         "w": randn(B, T, HV, K, std=0.3) if update_rule == "delta" else None,
         "g": -rng.uniform(0.05, 0.5, (B, T, HV, lanes)).astype(np.float32),
         "h0": randn(N, HV, K, V), "do": randn(B, T, HV, V), "dht": randn(N, HV, K, V)}
    if resets:  # chunks of 8: [0, 8), [8, 11) and [11, 19), [19, 20)
        x["g"][0, [3, 8, 11, 18], :, :1] = -np.inf
        x["g"][0, [5, 7, 15], 1, :] = -1e30
    ref = _numpy_stages(x, bounds, HV // H, C, scale)

    L = NumbaLauncher(np)
    st = NumbaChunkStages(L, bounds, C, H, HV, K, V, gate_form, update_rule)
    d = {n: None if a is None else L.put(a) for n, a in x.items()}
    got = {n: np.full_like(r, np.nan, dtype=np.float32) for n, r in ref.items()}
    o = {n: L.out(a) for n, a in got.items()}
    G, R = L.scratch(B, T, HV, lanes), L.scratch(B, T, HV, lanes)
    h, delta = L.scratch(st.n_chunks, HV, K, V), L.scratch(B, T, HV, V)
    dh, dexp, dexp_end = L.scratch(st.n_chunks, HV, K, V), L.scratch(B, T, HV, C + 1, lanes), L.scratch(B, T, HV, lanes)
    st.chunk_local_cumsum(d["g"], G, R)
    st.state_pass_fwd(d["k"], G, R, d["u"], d["h0"], h, delta, o["ht"], w=d["w"])
    st.chunk_output(d["q"], d["k"], G, R, h, delta, o["o"], scale)
    st.chunk_output_dv_local(d["q"], d["k"], G, R, d["do"], o["ddelta"], scale)
    st.state_pass_bwd(d["q"], d["k"], G, R, d["do"], d["dht"], o["ddelta"], dh, o["dh0"], scale, w=d["w"])
    st.chunk_qk_grads(d["q"], d["k"], G, R, h, dh, delta, o["ddelta"], d["do"], o["dq"], o["dk"], dexp, dexp_end,
                      scale, dw=o.get("dw"))
    st.gate_grad(dexp, dexp_end, o["dg"])
    L.finish()
    for n in ref:
        assert_close(n, ref[n], got[n], dtype="float32")


@pytest.mark.numba_sim
@pytest.mark.parametrize("value", [-np.inf, -1e30, -1e4], ids=["-inf", "-1e30", "-1e4"])
def test_resets(value: float) -> None:
    """Gates whose decay is 0 at a chunk's first row, inside (two in a row), at its last row and in one head only:
    the exact reset of the recurrence."""
    inputs = gated_delta_rule_inputs(1, 40, 1, 4, 3, HV=2, seed=10, use_qk_l2norm_in_kernel=True)
    inputs["g"][0, [16, 20, 21, 31]] = value
    inputs["g"][0, 5, 1] = value
    check_backend("numba", inputs, mode="chunk", chunk_size=16)


_GPU_CASES = [
    ("dense", {"B": 2, "T": 200, "H": 2, "HV": 4, "K": 64, "V": 64}, {}),
    (
        "varlen_all_options",
        {
            "B": 1,
            "T": 0,
            "H": 2,
            "HV": 4,
            "K": 64,
            "V": 64,
            "seqlens": (100, 0, 67, 1, 64),
            "use_qk_l2norm_in_kernel": True,
            "use_beta_sigmoid_in_kernel": True,
        },
        {"allow_neg_eigval": True},
    ),
    (
        "gate_in_kernel",
        {"B": 2, "T": 130, "H": 1, "HV": 2, "K": 64, "V": 32, "use_gate_in_kernel": True, "initial_state": False},
        {},
    ),
    ("K256", {"B": 1, "T": 40, "H": 1, "HV": 2, "K": 256, "V": 16, "use_qk_l2norm_in_kernel": True}, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("shape", "extra"), [c[1:] for c in _GPU_CASES], ids=[c[0] for c in _GPU_CASES])
def test_gpu_cupy(shape: dict[str, Any], extra: dict[str, Any], dtype: str, chunk_size: int) -> None:
    check_backend("numba", make_inputs(shape, dtype=dtype, seed=7), device=True, mode="chunk",
                  chunk_size=chunk_size, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in CHUNK_OPTIONS], ids=[o[0] for o in CHUNK_OPTIONS])
def test_gpu_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...]) -> None:
    inputs = gated_delta_rule_inputs(2, 20, 1, 4, 3, HV=2, seed=1, **gen)
    check_backend("numba", inputs, drop=drop, device=True, mode="chunk", chunk_size=16, **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in CHUNK_SHAPES], ids=[s[0] for s in CHUNK_SHAPES])
def test_gpu_shapes(shape: dict[str, Any], use_dht: bool) -> None:
    check_backend("numba", make_inputs(shape, seed=2), use_dht=use_dht, device=True, mode="chunk", chunk_size=16)


@pytest.mark.gpu
def test_gpu_cupy_on_a_stream() -> None:
    """Launches follow CuPy's current stream: results are ordered with the CuPy work around them."""
    import cupy

    with cupy.cuda.Stream(non_blocking=True):
        check_backend("numba", gated_delta_rule_inputs(2, 70, 2, 32, 48, HV=4, seed=8), device=True, use_dht=False,
                      mode="chunk", chunk_size=32)
