"""chunk_gla's cuda backend on what the contract tests do not run: every chunk size and input dtype at sizes that take
several key slices, value blocks and 16-row sub-blocks, K = 256, resets in some keys only, strongly decaying gates,
the Hopper (wgmma) state passes in each configuration and the mma.sync ones on the same device, and a deterministic
backward. Each is compared with the float64 reference of the same call (forward and every gradient, dh0 and the dht
path included)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops import registry
from rawdelta.ops.gla import cuda_chunk
from rawdelta.testing import assert_close, assert_same_bits, gla_inputs, grad_label, to_device, to_host
from rawdelta.testing.compare import error_stats
from rawdelta.testing.inputs import split_op_args
from rawdelta.testing.reference import reference_results

from ..contract._ops import check_backend
from .launches import record_launches
from .workspace_checks import check_through_a_workspace

pytestmark = pytest.mark.gpu
OP = registry.op("chunk_gla")
# What both chunked ops must do alike (fused_chunk_gla's own limits: tests/ops/test_gla_fused_chunk_cuda.py)
CHUNKED = [OP, registry.op("fused_chunk_gla")]


def _inputs(params: dict[str, Any], seed: int, dtype: str = "float32", op: Any = OP
            ) -> tuple[dict[str, Any], Any, Any]:
    kw, do, dht = split_op_args(gla_inputs(**params, seed=seed, dtype=dtype, gk=False))
    return {n: x for n, x in kw.items() if n in op.takes}, do, dht


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_chunk_sizes_and_dtypes(dtype: str, chunk_size: int) -> None:
    """K = 100 (two key slices, padded to 128), V = 72 (three value blocks, the last partial), T off the chunk."""
    kw, do, dht = _inputs({"B": 2, "T": 150, "H": 2, "K": 100, "V": 72}, 11, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": chunk_size}, do, dht, device=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_k256_varlen(dtype: str) -> None:
    kw, do, dht = _inputs({"B": 1, "T": 0, "H": 2, "K": 256, "V": 64, "seqlens": (70, 0, 1, 129)}, 12, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_resets_in_some_keys(op: Any) -> None:
    """-inf and -1e30 in some keys of some tokens, at a chunk's first row, inside it and at its last row."""
    kw, do, dht = _inputs({"B": 2, "T": 96, "H": 2, "K": 40, "V": 24}, 13, op=op)
    g = kw["g"].copy()
    g[:, 32, :, 1:5] = -np.inf
    g[:, 45, 0, ::3] = -1e30
    g[:, 63, 1, 7] = -np.inf
    kw["g"] = g
    check_backend(op, "cuda", {**kw, "chunk_size": 32}, do, dht, device=True)


@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_strong_decay(op: Any) -> None:
    """Gates near -20 per token: every decay across more than a few tokens underflows, no factor overflows."""
    kw, do, dht = _inputs({"B": 1, "T": 80, "H": 1, "K": 32, "V": 16}, 14, op=op)
    kw["g"] = (kw["g"] * 0 - 20.0 + np.random.default_rng(0).uniform(-1, 1, kw["g"].shape)).astype(np.float32)
    check_backend(op, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_gate_span_differs_by_key_slice(op: Any) -> None:
    """Chunks where the first 64 keys decay mildly (one reference per chunk serves their whole slice) and the last 64
    by about -3 per token (their span exceeds what a product's factors allow: the per-sub-block path), and a chunk
    where the first slice resets and the second is mild: both ways of computing a slice's scores meet in one
    chunk's sums, in both orders."""
    kw, do, dht = _inputs({"B": 1, "T": 150, "H": 2, "K": 128, "V": 32}, 19, "bfloat16", op)
    g = kw["g"].copy()
    g[:, :128, :, 64:] = -3.0 + np.random.default_rng(1).uniform(-0.5, 0.5, g[:, :128, :, 64:].shape)
    g[:, 130, 0, 5] = -np.inf
    kw["g"] = g.astype(np.float32)
    check_backend(op, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize("extra", [None, (3, 4)], ids=["second_slice", "both_slices"])
@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_dead_rows_found_in_a_later_key_slice(op: Any, extra: tuple[int, int] | None) -> None:
    """A NaN gate at token t = 70 (inside the second chunk of 64) of key 100 only, in the second key slice of K = 128
    (prepare learns of a dead row from each slice's gate cumsums); ``both_slices``: also +inf at t + 4 of key 3, in
    the first slice, whose own first dead row is later than the chunk's. The outputs before t equal the call
    truncated to [0, t) and, with do zero from t on and no final-state cotangent, so do the gradients of the tokens
    before t and dh0."""
    t = 70
    kw, do, _ = _inputs({"B": 2, "T": 150, "H": 2, "K": 128, "V": 32}, 24, "bfloat16", op)
    trunc = {n: (x[:, :t] if n in ("q", "k", "v", "g") else x) for n, x in kw.items()}
    g = kw["g"].copy()
    g[:, t, :, 100] = np.nan
    if extra is not None:
        g[:, t + extra[1], :, extra[0]] = np.inf
    kw["g"] = g
    do = do.copy()
    do[:, t:] = 0
    ref_out, ref_grads = reference_results(op, trunc, do[:, :t], None, mode_op=True)
    (o, ht), res = getattr(rawdelta, f"{op.name}_fwd")(**to_device(kw), output_final_state=True, chunk_size=64,
                                                       backend="cuda")
    import cupy

    grads = getattr(rawdelta, f"{op.name}_bwd")(res, cupy.asarray(do), None)
    assert_close("o", ref_out["o"], to_host(o)[:, :t], dtype="bfloat16")
    assert np.isnan(to_host(o)[:, t:]).any()
    for n in ("q", "k", "v", "g"):
        assert_close(grad_label(n), ref_grads[n], to_host(getattr(grads, n))[:, :t], dtype="bfloat16")
    assert_close(grad_label("initial_state"), ref_grads["initial_state"], to_host(grads.initial_state),
                 dtype="bfloat16")


@pytest.mark.parametrize("normalizer", [0.1, 10.0])
@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_peer_gate_normalizers(op: Any, normalizer: float) -> None:
    """The peer's test gates, logsigmoid(x) / normalizer: strong decay at 0.1, nearly none at 10."""
    kw, do, dht = split_op_args(gla_inputs(B=2, T=130, H=2, K=64, V=64, seed=18, dtype="bfloat16", gk=False,
                                           gate_normalizer=normalizer))
    kw = {n: x for n, x in kw.items() if n in op.takes}
    check_backend(op, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)


@pytest.mark.parametrize("op", CHUNKED, ids=lambda o: o.name)
def test_backward_is_deterministic(op: Any) -> None:
    kw, do, dht = _inputs({"B": 2, "T": 200, "H": 4, "K": 128, "V": 128}, 15, "bfloat16", op)
    import cupy

    kw = to_device(kw)
    _, res = getattr(rawdelta, f"{op.name}_fwd")(**kw, output_final_state=True, chunk_size=64, backend="cuda")
    bwd = getattr(rawdelta, f"{op.name}_bwd")
    assert_same_bits(bwd(res, cupy.asarray(do), cupy.asarray(dht)), bwd(res, cupy.asarray(do), cupy.asarray(dht)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_factors_kept_and_through_a_workspace(dtype: str) -> None:
    """The backward takes the forward's factors and chunk states (no second prepare, no storing pass), and the
    adapters' path gives the same bits: a forward given a workspace of ``workspace_nbytes`` bytes (filled with NaN
    bits; varlen, so the states' room is a bound) writes every byte of it, and what is read back from it (the
    per-chunk decays recomputed from g) gives the gradients of the recompute path. A workspace of another size is
    neither written nor read."""
    import cupy

    kw, do, dht = _inputs({"B": 1, "T": 0, "H": 2, "K": 100, "V": 72, "seqlens": (70, 0, 1, 128, 64)}, 17, dtype)
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    _, res = rawdelta.chunk_gla_fwd(**kw, output_final_state=True, chunk_size=64, backend="cuda")
    assert res.saved is not None
    kept = rawdelta.chunk_gla_bwd(res, do, dht)
    recomputed = rawdelta.chunk_gla_bwd(res._replace(saved=None), do, dht)
    assert_same_bits(recomputed, kept)

    cc = str(cupy.cuda.Device().compute_capability)
    shapes = {"q": kw["q"].shape, "v": kw["v"].shape, "cu_seqlens": kw["cu_seqlens"].shape}
    nbytes = cuda_chunk.workspace_nbytes(shapes, kw["q"].dtype, {"chunk_size": 64}, cc)
    check_through_a_workspace(res, nbytes, cuda_chunk.saved_from_workspace, rawdelta.chunk_gla_bwd, recomputed, do,
                              dht)


def _hopper() -> bool:
    from rawdelta.cuda.loader import wgmma_available

    return wgmma_available()


def _run_with(monkeypatch: pytest.MonkeyPatch, wgmma: bool, config: tuple[int, int, bool] | None = None,
              segments: int | None = None) -> None:
    """From now on chunk_gla's cuda backend runs its Hopper passes or not (`wgmma`), in `config` where given, with
    `segments` segments per sequence in its forward-direction state passes where given."""
    fwd, bwd = cuda_chunk.chunk_forward, cuda_chunk.chunk_backward

    def forward(p: Any, workspace: Any = None) -> tuple[Any, Any]:
        o, ht, ch = fwd(p, p.chunk_size, wgmma, segments=segments)
        return (o, ht), ch

    monkeypatch.setattr(cuda_chunk, "forward", forward)
    monkeypatch.setattr(cuda_chunk, "backward", lambda p, saved, do, dht: bwd(p, p.chunk_size, do, dht, wgmma,
                                                                              saved, segments))
    if config is not None:
        monkeypatch.setattr(cuda_chunk._Chunks, "wg_config", lambda self, p: config)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mma_sync_passes_on_hopper(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Hopper passes off, 16-bit chunks of 64 run the mma.sync passes (what sm_80 runs)."""
    _run_with(monkeypatch, False)
    launched = record_launches(monkeypatch, "gla_chunk_")
    kw, do, dht = _inputs({"B": 2, "T": 150, "H": 2, "K": 128, "V": 96}, 16, dtype)
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)
    assert any(n.startswith("gla_chunk_fwd_kernel<") for n in launched), launched
    assert not any("_wg_kernel" in n for n in launched), launched


@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "mma_sync"])
def test_dv_error_is_that_of_dk(wgmma: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With bf16 inputs, dv's error against float64 is at most 1.08 x dk's (the peer's are equal): the reverse pass
    takes the scores as hi + lo parts in P^T do, as the peer keeps them in float32 there. Scores rounded to bf16 made
    dv's 1.2 x dk's (2.85e-03 against 2.38e-03 at (8, 2048, 16, 128) on the H100)."""
    import cupy

    if wgmma and not _hopper():
        pytest.skip("the Hopper state passes need a compute capability 9.0 device")
    _run_with(monkeypatch, wgmma)
    launched = record_launches(monkeypatch, "gla_chunk_bwd")
    kw, do, dht = _inputs({"B": 1, "T": 512, "H": 2, "K": 128, "V": 128}, 19, "bfloat16")
    _, grads = reference_results(OP, kw, do, dht)
    _, res = rawdelta.chunk_gla_fwd(**to_device(kw), output_final_state=True, chunk_size=64, backend="cuda")
    got = rawdelta.chunk_gla_bwd(res, cupy.asarray(do), cupy.asarray(dht))
    want = "gla_chunk_bwd_wg_kernel<" if wgmma else "gla_chunk_bwd_state_kernel<"
    assert any(n.startswith(want) for n in launched), launched
    err_v, _, _ = error_stats(grads["v"], to_host(got.v))
    err_k, _, _ = error_stats(grads["k"], to_host(got.k))
    assert err_v <= 1.08 * err_k, (err_v, err_k)


# (warpgroups per block, value columns per warpgroup, prefetch) of the Hopper passes, and the shapes they fit
_WG_CONFIGS = [(2, 32, False), (2, 32, True), (2, 16, False), (2, 16, True), (4, 32, True), (4, 16, True)]
_WG_SHAPES = {"K64_V48": {"B": 2, "T": 150, "H": 2, "K": 64, "V": 48},
              "K128_varlen": {"B": 1, "T": 0, "H": 2, "K": 128, "V": 136, "seqlens": (70, 0, 1, 128, 64)},
              "K256": {"B": 1, "T": 130, "H": 1, "K": 256, "V": 64}}


@pytest.mark.parametrize("config", _WG_CONFIGS, ids=[f"wg{c[0]}x{c[1]}_{'pipe' if c[2] else 'single'}"
                                                     for c in _WG_CONFIGS])
@pytest.mark.parametrize("shape", list(_WG_SHAPES))
def test_hopper_passes(shape: str, config: tuple[int, int, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    if not _hopper():
        pytest.skip("the Hopper state passes need a compute capability 9.0 device")
    if _WG_SHAPES[shape]["K"] > 128 and config[:2] != (2, 16):
        pytest.skip("K = 256 takes two warpgroups of 16 columns only")
    _run_with(monkeypatch, True, config)
    launched = record_launches(monkeypatch, "gla_chunk_")
    kw, do, dht = _inputs(_WG_SHAPES[shape], 17, "bfloat16")
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)
    assert any(n.startswith("gla_chunk_fwd_wg_kernel<") for n in launched), launched
    assert any(n.startswith("gla_chunk_bwd_wg_kernel<") for n in launched), launched


@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "mma_sync"])
@pytest.mark.parametrize("segments", [2, 4])
def test_segmented_state_passes(segments: int, wgmma: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sequence cut into segments for the forward-direction state passes (the forward's, and the backward's
    recompute from the forward's segment start states): the output, the final state and every gradient against
    the float64 reference, with an initial state, dht, and resets of some keys on a segment's first row and inside
    a segment."""
    if wgmma and not _hopper():
        pytest.skip("the Hopper state passes need a compute capability 9.0 device")
    _run_with(monkeypatch, wgmma, segments=segments)
    launched = record_launches(monkeypatch, "")
    kw, do, dht = _inputs({"B": 2, "T": 512, "H": 2, "K": 64, "V": 48}, 21, "bfloat16")
    g = kw["g"].copy()
    g[:, 128, :, :5] = -np.inf  # the first row of a segment (for 2 and 4 segments of 256 and 128 tokens)
    g[1, 200, 1, 7:9] = -np.inf
    kw["g"] = g
    check_backend(OP, "cuda", {**kw, "chunk_size": 64}, do, dht, device=True)
    assert "segment_combine_kernel" in launched, launched


@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "mma_sync"])
@pytest.mark.parametrize("segments", [1, 4])
def test_states_kept_by_the_forward(segments: int, wgmma: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward whose backward follows (``chunk_gla_fwd``) keeps each chunk's start state (the Hopper pass that
    writes o stores them as it goes; the mma.sync forward runs the storing pass after it), so its backward runs no
    forward-direction pass; the gradients are those of a backward that recomputes the states, bit for bit. A plain
    forward keeps none, nor the scores' lo part that only the reverse pass reads (its output is the same bits), and a
    backward given its factors runs prepare again. With resets and a dead row (NaN gate), so that the kept states
    carry both."""
    import cupy

    from rawdelta.ops.common.api import run_forward

    if wgmma and not _hopper():
        pytest.skip("the Hopper state passes need a compute capability 9.0 device")
    _run_with(monkeypatch, wgmma, segments=segments)
    kw, do, dht = _inputs({"B": 2, "T": 512, "H": 2, "K": 64, "V": 48}, 23, "bfloat16")
    g = kw["g"].copy()
    g[:, 128, :, :5] = -np.inf
    g[1, 300, 0, 3] = np.nan
    kw["g"] = g
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    _, res = rawdelta.chunk_gla_fwd(**kw, output_final_state=True, chunk_size=64, backend="cuda")
    assert res.saved.states_kept and res.saved.hbuf is not None
    launched = record_launches(monkeypatch, "")
    kept = rawdelta.chunk_gla_bwd(res, do, dht)
    assert not [n for n in launched if n.startswith(("gla_chunk_fwd", "segment_combine"))], launched
    (o, ht), plain = run_forward(res.problem.replace(for_backward=False))
    assert plain.saved.hbuf is None and not plain.saved.states_kept and plain.saved.Alo is None
    for want, got in zip(run_forward(res.problem)[0], (o, ht)):
        np.testing.assert_array_equal(cupy.asnumpy(want).view(np.uint8), cupy.asnumpy(got).view(np.uint8))
    del launched[:]
    recomputed = rawdelta.chunk_gla_bwd(plain, do, dht)
    assert any(n.startswith("gla_chunk_fwd") for n in launched), launched
    assert any(n.startswith("gla_chunk_prepare") for n in launched), launched
    assert_same_bits(recomputed, kept)


def test_segmented_forward_keeps_dead_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN gate (a dead row) in one sequence's second segment: the segmented forward gives the unsegmented one's
    NaNs (from that token on, that sequence only) and, elsewhere, its values."""
    kw, _, _ = _inputs({"B": 2, "T": 512, "H": 2, "K": 64, "V": 48}, 22, "bfloat16")
    g = kw["g"].copy()
    g[0, 300, 1, 3] = np.nan
    kw["g"] = g
    outs = []
    for segments in (1, 4):
        _run_with(monkeypatch, _hopper(), segments=segments)
        (o, ht), _ = rawdelta.chunk_gla_fwd(**to_device(kw), output_final_state=True, chunk_size=64, backend="cuda")
        outs.append((to_host(o).astype(np.float64), to_host(ht)))
    (o1, h1), (o4, h4) = outs
    assert np.isnan(o1[0, 300:, 1]).any() and not np.isnan(o1[0, :300]).any() and not np.isnan(o1[1]).any()
    np.testing.assert_array_equal(np.isnan(o4), np.isnan(o1))
    np.testing.assert_array_equal(np.isnan(h4), np.isnan(h1))
    np.testing.assert_allclose(np.nan_to_num(o4), np.nan_to_num(o1), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.nan_to_num(h4), np.nan_to_num(h1), rtol=1e-3, atol=1e-3)
