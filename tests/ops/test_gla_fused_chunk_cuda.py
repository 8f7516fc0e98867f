"""fused_chunk_gla's cuda backend on what the contract tests do not run and its sizes differ in: every chunk size and
input dtype, K and V up to the kernels' 128 (one block per sequence and head holds the whole state), K != V, varlen
with empty sequences, and the shared-memory refusals of float32 inputs at chunk_size=64 (the forward's with K, V > 64,
the backward's with K or V > 64). Resets in some keys, strong decay, the peer's gate normalizers and a deterministic
backward are tests/ops/test_gla_chunk_cuda.py's, for both chunked ops. Each is compared with the float64 reference of
the same call (forward and every gradient, dh0 and the dht path included)."""

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


def test_float32_chunk64_k128_v128_is_refused() -> None:
    """Over one block's shared memory: a ValueError before launch, which names the way out."""
    kw, _, _ = _inputs({"B": 1, "T": 70, "H": 1, "K": 100, "V": 100}, 18)
    with pytest.raises(ValueError, match="shared memory"):
        rawdelta.fused_chunk_gla(**to_device(kw), chunk_size=64, backend="cuda")


def test_float32_chunk64_k100_backward_is_refused() -> None:
    """The backward's shared memory is larger than the forward's: float32 at chunk_size=64 with K > 64 runs forward
    and is refused by the backward, a ValueError before launch."""
    kw, do, dht = _inputs({"B": 1, "T": 70, "H": 1, "K": 100, "V": 56}, 19)
    import cupy

    _, res = rawdelta.fused_chunk_gla_fwd(**to_device(kw), output_final_state=True, chunk_size=64, backend="cuda")
    with pytest.raises(ValueError, match="backward.*shared memory"):
        rawdelta.fused_chunk_gla_bwd(res, cupy.asarray(do), cupy.asarray(dht))
