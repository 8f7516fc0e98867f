"""The ``numba`` backend of the chunked gated delta rule against the float64 recurrent reference.

Every chunked-mode option, forward (o, final state) and every gradient (dh0 and the dht path included).
``numba_sim`` tests use tiny shapes with T crossing chunks of 16 (the CUDA simulator runs each thread in
Python); ``gpu`` tests run the same kernels on a real GPU with CuPy device arrays and bigger shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops.gated_delta_rule import naive
from rawdelta.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from rawdelta.ops.gated_delta_rule.numba_chunk import chunk_tables
from rawdelta.ops.gated_delta_rule.problem import make_problem
from rawdelta.testing import assert_close, gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import CHUNK_OPTIONS, CHUNK_SHAPES, check_backend, make_inputs


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
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
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
