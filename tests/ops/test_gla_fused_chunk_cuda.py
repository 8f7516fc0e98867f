"""fused_chunk_gla's cuda backend on what the contract tests do not run and its sizes differ in: every chunk size and
input dtype, K and V up to the backward's 128 (one block per sequence and head holds the whole state), the forward's
value blocks of each width, K != V, varlen with empty sequences, the backward's chunks of 32 where its tiles at 64 do
not fit, and the gate gradient over a long sequence. Resets in some keys, strong decay, the peer's gate normalizers
and a deterministic backward are tests/ops/test_gla_chunk_cuda.py's, for both chunked ops. Each is compared with the
float64 reference of the same call (forward and every gradient, dh0 and the dht path included)."""

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
    """K = 100 (two key slices of the factors, padded to 128), V = 56 (padded to 64), T off the chunk."""
    kw, do, dht = _inputs({"B": 2, "T": 150, "H": 2, "K": 100, "V": 56}, 11, dtype)
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


@pytest.mark.parametrize("vb", [32, 64, 128])
def test_value_blocks(vb: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward's value blocks of each width, the last one partial (V = 100), several sequences and heads."""
    from rawdelta.ops.gla import cuda_fused_chunk

    monkeypatch.setattr(cuda_fused_chunk, "fwd_value_block", lambda p, sms: vb)
    kw, do, dht = _inputs({"B": 2, "T": 90, "H": 3, "K": 48, "V": 100}, 20, "bfloat16")
    check_backend(OP, "cuda", {**kw, "chunk_size": 32}, do, dht, device=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("K", "V"), [(100, 56), (100, 100)])
def test_backward_chunks_of_32_where_64_does_not_fit(dtype: str, K: int, V: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """At chunk_size=64 with K or V > 64 the backward's split tiles do not fit one block: it runs chunks of 32 (the
    same function; forward and every gradient against the float64 reference)."""
    from rawdelta.ops.gla import cuda_fused_chunk

    kw, do, dht = _inputs({"B": 1, "T": 70, "H": 1, "K": K, "V": V}, 19, dtype)
    chosen = []
    real = cuda_fused_chunk.bwd_config
    monkeypatch.setattr(cuda_fused_chunk, "bwd_config", lambda p: chosen.append(real(p)) or chosen[-1])
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)
    assert [c[1] for c in chosen] == [32], chosen


def test_long_sequence_gate_gradient() -> None:
    """The gate gradient sums, per key, terms of the whole sequence that cancel down to a much smaller value: with
    the backward's split operands its error at T = 8192 (bf16) stays within twice chunk_gla's, which sums per chunk
    (16-bit operands gave 0.11 relative RMS at T = 2048 in a float64 model of it)."""
    import cupy

    from rawdelta.testing import error_stats, reference_results

    kw, do, dht = _inputs({"B": 1, "T": 8192, "H": 1, "K": 64, "V": 64}, 21, "bfloat16")
    _, ref = reference_results(OP, {**kw, "chunk_size": 64}, do, dht)
    errors = {}
    for name in ("fused_chunk_gla", "chunk_gla"):
        _, res = getattr(rawdelta, f"{name}_fwd")(**to_device(kw), output_final_state=True, chunk_size=64,
                                                  backend="cuda")
        dg = getattr(rawdelta, f"{name}_bwd")(res, cupy.asarray(do), cupy.asarray(dht)).g
        errors[name] = error_stats(ref["g"], dg)[0]
    assert errors["fused_chunk_gla"] <= 2 * errors["chunk_gla"] + 1e-4, errors
