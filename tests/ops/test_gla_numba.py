"""GLA's Numba reference kernels (in the CUDA simulator without a GPU) on what the contract tests do not
run there: the chunked op at every chunk size (the contract runs chunks of 16), ``reverse=True``, resets in some
elements of a per-key or per-value gate, and ``fused_chunk_gla`` against ``chunk_gla``. Each is compared with the
float64 numpy backend of the same call by the contract tests' comparison (forward and every gradient, dh0 and the
dht path included)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.ops import registry
from rawdelta.testing import gla_inputs
from rawdelta.testing.inputs import split_op_args

from ..contract._ops import check_backend

pytestmark = pytest.mark.numba_sim


def _check(op: str, params: dict[str, Any], seed: int, edit: Any = None, **call: Any) -> None:
    o = registry.op(op)
    kw, do, dht = split_op_args(gla_inputs(**params, seed=seed))
    kw = {n: x for n, x in kw.items() if n in o.takes}
    if edit is not None:
        edit(kw)
    check_backend(o, "numba", {**kw, **call}, do, dht)


@pytest.mark.parametrize("chunk_size", [32, 64, None])
def test_chunk_sizes(chunk_size: int | None) -> None:
    _check("chunk_gla", {"B": 1, "T": 0, "H": 1, "K": 4, "V": 3, "seqlens": (70, 0, 33)}, 1, chunk_size=chunk_size)


def test_reverse() -> None:
    _check("fused_recurrent_gla", {"B": 1, "T": 0, "H": 2, "K": 3, "V": 4, "seqlens": (5, 0, 7), "gv": True}, 2,
           reverse=True)


def _partial_resets(kw: dict[str, Any]) -> None:
    for name in ("g", "gk", "gv"):
        if name in kw:
            kw[name] = kw[name].copy()
            kw[name][:, 6, :, 1:3] = -np.inf
            kw[name][:, 16, 0, 0] = -1e30


@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_resets_in_some_elements(op: str) -> None:
    _check(op, {"B": 2, "T": 20, "H": 2, "K": 4, "V": 3, "gv": True}, 3, _partial_resets,
           **({"chunk_size": 16} if op == "chunk_gla" else {}))


def test_fused_chunk_equals_chunk() -> None:
    import rawdelta

    kw, do, dht = split_op_args(gla_inputs(B=1, T=0, H=1, K=4, V=3, seqlens=(20, 0, 5), seed=4))
    kw = {n: x for n, x in kw.items() if n in registry.op("chunk_gla").takes}
    results = []
    for op in ("chunk_gla", "fused_chunk_gla"):
        outs, res = getattr(rawdelta, f"{op}_fwd")(**kw, chunk_size=16, output_final_state=True, backend="numba")
        results.append([*outs, *getattr(rawdelta, f"{op}_bwd")(res, do, dht)])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(b, a)
