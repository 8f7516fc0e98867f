"""GLA's float64 references (the numpy backends): what the contract tests do not cover.

- The chunked algorithm (naive_chunk.py, through the shared chunk stages) equals the recurrence (naive.py) at every
  chunk size, ``None`` (the peer's choice) included: forward, final state and every gradient (dh0 and the dht path
  included), dense and packed with an empty sequence, to 1e-12 / 1e-10; and with per-key resets in some elements.
- ``fused_chunk_gla`` equals ``chunk_gla``.
- ``reverse=True`` equals the forward scan of the time-flipped sequences (packed ones each flipped on its own), and
  its hand-written backward matches finite differences.
- The peer's chunk size for ``chunk_size=None``.
- ``-inf`` in some elements of gk (gv) zeroes only those rows (columns) of the state.
- The public references keep the peer's argument order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops.common.validation import validate
from rawdelta.ops.gla.definition import CHUNK as CHUNK_OP
from rawdelta.ops.gla.definition import CHUNK_SIZES, peer_chunk_size
from rawdelta.ops.gla.definition import RECURRENT as RECURRENT_OP

from ..contract._ops import finite_difference
from .gla_cases import CHUNK, FUSED_CHUNK, RECURRENT, assert_same, inputs, run

OUT_RTOL, GRAD_RTOL = 1e-12, 1e-10
SHAPES = {
    "dense": {"B": 2, "T": 70, "H": 2, "K": 5, "V": 3},
    "varlen": {"B": 1, "T": 0, "H": 1, "K": 4, "V": 6, "seqlens": (17, 0, 40, 1, 33)},
}


def _tol(name: str) -> float:
    return OUT_RTOL if name in ("o", "final_state") else GRAD_RTOL


def _assert_all(ref: dict[str, Any], got: dict[str, Any]) -> None:
    for name in ref:
        assert_same({name: ref[name]}, {name: got.get(name)}, _tol(name))


@pytest.mark.parametrize("chunk_size", [*CHUNK_SIZES, None])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_chunked_equals_recurrent(shape: str, chunk_size: int | None) -> None:
    kw, do, dht = inputs(seed=1, **SHAPES[shape])
    ref = run(RECURRENT, kw, do, dht)
    _assert_all(ref, run(CHUNK, kw, do, dht, chunk_size=chunk_size))


def test_fused_chunk_equals_chunk() -> None:
    kw, do, dht = inputs(seed=2, **SHAPES["varlen"])
    for chunk_size in (16, None):
        want = run(CHUNK, kw, do, dht, chunk_size=chunk_size)
        got = run(FUSED_CHUNK, kw, do, dht, chunk_size=chunk_size)
        for name, x in want.items():
            assert (x is None) == (got[name] is None), name
            if x is not None:
                np.testing.assert_array_equal(got[name], x, err_msg=name)


@pytest.mark.parametrize("reset", [-np.inf, -1e30])
def test_partial_key_resets_chunked_equals_recurrent(reset: float) -> None:
    """A reset in some key dimensions of a token (inside a chunk, and at a chunk's first row) is the same exact reset
    of those rows in both forms, forward and backward."""
    kw, do, dht = inputs(seed=3, **SHAPES["dense"])
    for name in ("g", "gk"):
        kw[name] = kw[name].copy()
        kw[name][:, 20, :, 1:3] = reset
        kw[name][:, 32, 1, 0] = reset
    ref = run(RECURRENT, kw, do, dht)
    got = run(CHUNK, kw, do, dht, chunk_size=16)
    _assert_all(ref, got)
    assert np.all(ref["gate"][:, 20, :, 1:3] == 0) and np.all(got["gate"][:, 32, 1, 0] == 0)


@pytest.mark.parametrize("gate", ["gk", "gv"])
def test_partial_reset_zeroes_only_its_rows_or_columns(gate: str) -> None:
    """-inf in some elements of gk (gv) at token t: the outputs from t on are those of a call started at t from the
    state before t with those rows (columns) zeroed and the gate there set to 0."""
    t, B, T, H, K, V = 5, 2, 9, 2, 4, 3
    kw, do, dht = inputs(seed=4, B=B, T=T, H=H, K=K, V=V, gv=True)
    rows = (slice(None), t, 0, slice(1, 3))
    kw[gate] = kw[gate].copy()
    kw[gate][rows] = -np.inf
    full = run(RECURRENT, kw, do, dht)
    before = run(RECURRENT, {n: (x[:, :t] if n in ("q", "k", "v", "gk", "gv") else x) for n, x in kw.items()},
                 do[:, :t], None)
    state = before["final_state"].copy()
    if gate == "gk":
        state[:, 0, 1:3, :] = 0.0
    else:
        state[:, 0, :, 1:3] = 0.0
    rest = {n: x[:, t:].copy() if n in ("q", "k", "v", "gk", "gv") else x for n, x in kw.items()}
    rest[gate][(slice(None), 0, 0, slice(1, 3))] = 0.0
    after = run(RECURRENT, {**rest, "initial_state": state}, do[:, t:], dht)
    assert_same({"o": after["o"], "final_state": after["final_state"]},
                {"o": full["o"][:, t:], "final_state": full["final_state"]}, OUT_RTOL)


def _flip_sequences(x: np.ndarray, cu: np.ndarray | None) -> np.ndarray:
    """A ``[B, T, ...]`` array with each sequence's tokens reversed (the whole of T without cu_seqlens)."""
    if cu is None:
        return x[:, ::-1].copy()
    out = x.copy()
    for s, e in zip(cu[:-1], cu[1:]):
        out[:, s:e] = x[:, s:e][:, ::-1]
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reverse_is_the_flipped_forward_scan(shape: str) -> None:
    kw, do, dht = inputs(seed=5, gv=True, **SHAPES[shape])
    cu = kw.get("cu_seqlens")
    flipped = {n: (_flip_sequences(x, cu) if n in ("q", "k", "v", "gk", "gv") else x) for n, x in kw.items()}
    want = run(RECURRENT, flipped, _flip_sequences(do, cu), dht)
    got = run(RECURRENT, kw, do, dht, reverse=True)
    for name, x in want.items():
        if x is not None and name not in ("final_state", "initial_state"):
            want[name] = _flip_sequences(x, cu)  # per-token results back in the caller's order
    _assert_all(want, got)


@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
def test_reverse_backward_matches_finite_differences(use_dht: bool) -> None:
    kw, do, dht = inputs(seed=6, B=1, T=0, H=1, K=3, V=2, seqlens=(3, 0, 2), gv=True)
    dht = dht if use_dht else None
    args = {n: x for n, x in kw.items() if n in RECURRENT_OP.takes}
    p = validate(RECURRENT_OP, {**args, "reverse": True, "output_final_state": True, "backend": "numpy"})
    backend = RECURRENT_OP.backends["numpy"]

    def loss(q: Any) -> float:
        (o, ht), _ = backend.function("forward")(q, None)
        return float(np.sum(o * do)) + (float(np.sum(ht * dht)) if dht is not None else 0.0)

    grads = backend.function("backward")(p, None, do, dht)
    for name in ("q", "k", "v", "gk", "gv", "initial_state"):
        fd = finite_difference(loss, p, name)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize(("T", "chunk"), [(0, 16), (1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64),
                                         (65, 64), (5000, 64)])
def test_peer_chunk_size(T: int, chunk: int) -> None:
    assert peer_chunk_size(T) == chunk


def test_chunk_size_none_takes_the_packed_length() -> None:
    """With cu_seqlens the peer's choice is made from the packed length, not from any one sequence."""
    kw, _, _ = inputs(B=1, T=0, H=1, K=3, V=2, seqlens=(5, 20, 3))
    p = validate(CHUNK_OP, {**{n: kw[n] for n in ("q", "k", "v", "g")}, "cu_seqlens": kw["cu_seqlens"]})
    assert p.chunk_size == 32


def test_large_key_dimension_on_numpy_and_the_numba_limit() -> None:
    """K above the Numba kernels' local state column (the peer tests K = 320): numpy computes it, numba refuses it
    before any launch, naming the backend and the limit."""
    kw, do, dht = inputs(seed=7, B=1, T=20, H=1, K=320, V=2)
    ref = run(RECURRENT, kw, do, dht)
    _assert_all(ref, run(CHUNK, kw, do, dht, chunk_size=16))
    f32 = {n: x.astype(np.float32) for n, x in kw.items()}
    with pytest.raises(NotImplementedError, match=r"backend='numba' supports K <= 256 .*got K=320"):
        rawdelta.chunk_gla(f32["q"], f32["k"], f32["v"], f32["g"], backend="numba")


def test_references_keep_the_peer_order() -> None:
    """``naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)`` and ``naive_chunk_gla(q, k, v, g,
    initial_state, output_final_state)`` positionally; their ``_bwd`` give the ops' numpy gradients."""
    kw, do, dht = inputs(seed=8, B=1, T=21, H=2, K=3, V=4)
    h0 = kw["initial_state"]
    o, ht = rawdelta.naive_recurrent_gla(kw["q"], kw["k"], kw["v"], kw["gk"], h0, True)
    o2, ht2 = rawdelta.naive_chunk_gla(kw["q"], kw["k"], kw["v"], kw["g"], h0, True, chunk_size=16)
    want = run(RECURRENT, kw, do, dht)
    assert_same({"o": want["o"], "final_state": want["final_state"]}, {"o": o, "final_state": ht}, 0.0)
    assert_same({"o": want["o"], "final_state": want["final_state"]}, {"o": o2, "final_state": ht2}, OUT_RTOL)
    grads = rawdelta.naive_recurrent_gla_bwd(kw["q"], kw["k"], kw["v"], kw["gk"], h0, do=do, dht=dht)
    assert_same({"gate": want["gate"], "q": want["q"]}, {"gate": grads.gk, "q": grads.q}, 0.0)
    assert o.dtype == np.float64 and ht.dtype == np.float64
