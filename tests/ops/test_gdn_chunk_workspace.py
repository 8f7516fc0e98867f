"""The layout of the chunked op's factor workspace (the adapters keep the forward's per-chunk factors in it for the
backward), on the host: the size ``factor_nbytes`` gives before a call is what the cuda backend carves the factor
arrays from (a host workspace here: the carve-up needs no GPU). Their use on the GPU:
``test_factors_through_a_workspace`` and the adapters' GPU tests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rawdelta.cuda.launch import CTYPES
from rawdelta.ops.gated_delta_rule import cuda_chunk
from rawdelta.ops.gated_delta_rule.cuda_chunk_factors import factor_arrays
from rawdelta.ops.gated_delta_rule.cuda_chunk_hopper import wg_layout
from rawdelta.testing import gated_delta_rule_inputs
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import make_problem

B, T, H, HV, K, V = 2, 70, 1, 3, 40, 24


def _problem(dtype: str, l2: bool) -> object:
    kw, _, _ = split_op_args(gated_delta_rule_inputs(B, T, H, K, V, HV=HV, dtype=dtype, seed=1,
                                                     use_qk_l2norm_in_kernel=l2))
    return make_problem("chunk", **kw, chunk_size=64)


@pytest.mark.parametrize(("dtype", "l2", "cc"), list(itertools.product(["float32", "float16", "bfloat16"],
                                                                         [False, True], ["80", "90"])))
def test_factor_arrays_tile_a_workspace_of_factor_nbytes(dtype: str, l2: bool, cc: str) -> None:
    p = _problem(dtype, l2)
    ct = CTYPES[np.dtype(p.q.dtype)]
    wg = wg_layout(ct, 64, K, V, cc)
    assert wg == (cc == "90" and dtype != "float32")
    nbytes = cuda_chunk.factor_nbytes((B, T, H, K), (B, T, HV, V), p.q.dtype, 64, l2, cc)
    statics = {"chunk_size": 64, "use_qk_l2norm_in_kernel": l2}
    assert cuda_chunk.workspace_nbytes({"q": (B, T, H, K), "v": (B, T, HV, V)}, p.q.dtype, statics, cc) == nbytes
    ws = np.zeros(nbytes, np.uint8)
    arrays = factor_arrays(p, 64, ct, wg, ws)
    assert arrays is not None
    expected = {"Gc", "Bc", "Rc", "Ahi", "Phi"} | ({"Rq", "Rk"} if l2 else set()) | (set() if wg else {"Alo"}) | (
        {"Plo"} if dtype == "float32" else set())
    assert set(arrays) == expected
    spans = []
    for name, a in arrays.items():
        per_token = name in ("Gc", "Bc", "Rc", "Rq", "Rk")
        assert a.shape == ((B * T, HV) if per_token else (B * T, HV, 64)) and np.shares_memory(a, ws), name
        start = a.__array_interface__["data"][0] - ws.__array_interface__["data"][0]
        assert start % (4 if per_token else 16) == 0, name  # the kernels' 16-byte accesses to the matrices
        spans.append((start, start + a.nbytes))
    spans.sort()
    # Packed without gaps: the prepare kernel writes every byte (so the workspace is a deterministic output).
    assert spans[0][0] == 0 and spans[-1][1] == nbytes
    assert all(end == nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "factor arrays overlap or leave gaps"
    assert factor_arrays(p, 64, ct, wg, np.zeros(nbytes + 16, np.uint8)) is None


def test_no_workspace_off_the_gpu_or_for_float64() -> None:
    shapes = ((B, T, H, K), (B, T, HV, V))
    assert cuda_chunk.factor_nbytes(*shapes, np.float32, 64, True, None) == 0
    assert cuda_chunk.factor_nbytes(*shapes, np.float64, 64, True, "90") == 0
    # bf16 chunks of 64 on sm_90 leave out the inverse's lo part, which only the mma.sync passes read
    lo = B * T * HV * 64 * 2
    assert (cuda_chunk.factor_nbytes(*shapes, np.float16, 64, False, "80")
            - cuda_chunk.factor_nbytes(*shapes, np.float16, 64, False, "90")) == lo
