"""fused_chunk_gla's cuda backend on what the contract tests do not run and its sizes differ in: every chunk size and
input dtype, K and V up to the backward's 128 (one block per sequence and head holds the whole state), the forward's
value blocks of both widths, K != V, varlen with empty sequences, and the backward's shared-memory refusal of float32
inputs at chunk_size=64 with K or V > 64 (the forward runs them). Resets in some keys, strong decay, the peer's gate
normalizers and a deterministic backward are tests/ops/test_gla_chunk_cuda.py's, for both chunked ops. Each is
compared with the float64 reference of the same call (forward and every gradient, dh0 and the dht path included)."""

from __future__ import annotations

from typing import Any

import pytest

import rawdelta
from rawdelta.ops import registry
from rawdelta.testing import gla_inputs, to_device
from rawdelta.testing.inputs import split_op_args

from ..contract._ops import check_backend

pytestmark = pytest.mark.gpu
OP = registry.op("fused_chunk_gla")


def _inputs(params: dict[str, Any], seed: int, dtype: str = "float32") -> tuple[dict[str, Any], Any, Any]:
    kw, do, dht = split_op_args(gla_inputs(**params, seed=seed, dtype=dtype, gk=False))
    return {n: x for n, x in kw.items() if n in OP.takes}, do, dht


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_chunk_sizes_and_dtypes(dtype: str, chunk_size: int) -> None:
    """K = 100 (two key slices of the factors, padded to 128), V = 56 (padded to 64), T off the chunk; K = 64 for
    float32 at chunk_size=64, the backward's largest K there."""
    K = 64 if (dtype, chunk_size) == ("float32", 64) else 100
    kw, do, dht = _inputs({"B": 2, "T": 150, "H": 2, "K": K, "V": 56}, 11, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": chunk_size}, do, dht, device=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_k128_v128(dtype: str) -> None:
    kw, do, dht = _inputs({"B": 1, "T": 200, "H": 2, "K": 128, "V": 128}, 16, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize(("K", "V"), [(24, 100), (100, 24), (3, 2)])
def test_k_ne_v(K: int, V: int) -> None:
    kw, do, dht = _inputs({"B": 2, "T": 70, "H": 1, "K": K, "V": V}, 17)
    check_backend(OP, "cuda", {**kw, "chunk_size": 32}, do, dht, device=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_varlen_empty(dtype: str) -> None:
    kw, do, dht = _inputs({"B": 1, "T": 0, "H": 2, "K": 64, "V": 40, "seqlens": (70, 0, 1, 129, 0)}, 12, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize("vb", [32, 64])
def test_value_blocks(vb: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward's value blocks of either width, the last one partial (V = 100), several sequences and heads."""
    from rawdelta.ops.gla import cuda_fused_chunk

    monkeypatch.setattr(cuda_fused_chunk, "fwd_value_block", lambda p, sms: vb)
    kw, do, dht = _inputs({"B": 2, "T": 90, "H": 3, "K": 48, "V": 100}, 20, "bfloat16")
    check_backend(OP, "cuda", {**kw, "chunk_size": 32}, do, dht, device=True)


@pytest.mark.parametrize(("K", "V"), [(100, 56), (100, 100)])
def test_float32_chunk64_backward_is_refused(K: int, V: int) -> None:
    """The backward's shared memory is larger than the forward's: float32 at chunk_size=64 with K or V > 64 runs
    forward (matching the float64 reference) and is refused by the backward, a ValueError before launch."""
    import cupy
    import numpy as np

    from rawdelta.testing import assert_close, reference_results, to_host

    kw, do, dht = _inputs({"B": 1, "T": 70, "H": 1, "K": K, "V": V}, 19)
    (o, ht), res = rawdelta.fused_chunk_gla_fwd(**to_device(kw), output_final_state=True, chunk_size=64,
                                                backend="cuda")
    ref, _ = reference_results(OP, {**{n: x.astype(np.float64) if hasattr(x, "astype") else x
                                       for n, x in kw.items()}, "chunk_size": 64})
    assert_close("o", ref["o"], to_host(o), dtype="float32")
    assert_close("final_state", ref["final_state"], to_host(ht), dtype="float32")
    with pytest.raises(ValueError, match="backward.*shared memory"):
        rawdelta.fused_chunk_gla_bwd(res, cupy.asarray(do), cupy.asarray(dht))
