"""The ``cuda`` backend of the chunked gated delta rule against the float64 recurrent reference (GPU only).

Forward (o, final state) and every gradient (dh0 and the dht path included) for every option of the
chunked mode, every input dtype and chunk size, grouped heads, varlen with empty sequences, K up to
256, K and V off the tile sizes; bitwise determinism of the backward; 2,050 packed sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rawdelta.cuda.loader import wgmma_available
from rawdelta.ops.gated_delta_rule import (
    chunk_gated_delta_rule_bwd,
    chunk_gated_delta_rule_fwd,
    cuda_chunk,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
    naive,
)
from rawdelta.ops.gated_delta_rule.cuda_chunk import ChunkOptions
from rawdelta.testing import assert_close, assert_same_bits, gated_delta_rule_inputs, grad_label, to_device, to_host
from rawdelta.testing.inputs import split_op_args

from .gdn_cases import CHUNK_OPTIONS, CHUNK_SHAPES, check_backend, make_inputs, make_problem
from .launches import record_launches
from .workspace_checks import check_through_a_workspace

pytestmark = pytest.mark.gpu
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in CHUNK_OPTIONS], ids=[o[0] for o in CHUNK_OPTIONS])
def test_options(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...], dtype: str) -> None:
    check_backend("cuda", gated_delta_rule_inputs(2, 77, 2, 24, 40, dtype=dtype, seed=1, **gen), device=True,
                  drop=drop, mode="chunk", chunk_size=32, **extra)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("use_dht", [True, False], ids=["dht", "no_dht"])
@pytest.mark.parametrize("shape", [s[1] for s in CHUNK_SHAPES], ids=[s[0] for s in CHUNK_SHAPES])
def test_shapes(shape: dict[str, Any], use_dht: bool, chunk_size: int) -> None:
    check_backend("cuda", make_inputs(shape, seed=2), device=True, use_dht=use_dht, mode="chunk",
                  chunk_size=chunk_size)


_LARGER = [
    ("K128_V128_T300", {"B": 2, "T": 300, "H": 2, "HV": 4, "K": 128, "V": 128}),
    ("K100_V200", {"B": 1, "T": 170, "H": 1, "HV": 2, "K": 100, "V": 200, "use_qk_l2norm_in_kernel": True}),
    ("K256", {"B": 1, "T": 140, "H": 1, "HV": 2, "K": 256, "V": 64, "use_qk_l2norm_in_kernel": True}),
    ("K64_varlen", {"B": 1, "T": 0, "H": 2, "HV": 4, "K": 64, "V": 64, "seqlens": (100, 0, 1, 65, 33),
                    "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}),
    ("K16_V8", {"B": 3, "T": 50, "H": 1, "K": 16, "V": 8}),
]


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [c[1] for c in _LARGER], ids=[c[0] for c in _LARGER])
def test_larger_shapes(shape: dict[str, Any], dtype: str, chunk_size: int) -> None:
    check_backend("cuda", make_inputs(shape, seed=3, dtype=dtype), device=True, mode="chunk", chunk_size=chunk_size)


def test_backward_is_bitwise_deterministic() -> None:
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 230, 2, 128, 96, HV=4, dtype="bfloat16", seed=4,
                                                        use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    runs = []
    for _ in range(3):
        (_, _), res = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, backend="cuda")
        runs.append(chunk_gated_delta_rule_bwd(res, do, dht))
    for other in runs[1:]:
        assert_same_bits(runs[0], other)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_reuses_the_forward_factors(dtype: str) -> None:
    """The per-chunk factors the forward leaves in the residuals give the backward's gradients bit for bit."""
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(1, 0, 2, 40, 24, HV=4, dtype=dtype, seed=6,
                                                        seqlens=(70, 0, 1, 64), use_gate_in_kernel=True,
                                                        use_qk_l2norm_in_kernel=True))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    (_, _), res = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, chunk_size=32, backend="cuda")
    assert res.saved is not None
    kept = chunk_gated_delta_rule_bwd(res, do, dht)
    recomputed = chunk_gated_delta_rule_bwd(res._replace(saved=None), do, dht)
    assert_same_bits(kept, recomputed)


@pytest.mark.parametrize(("dtype", "chunk_size"), [("float32", 32), ("bfloat16", 64)])
def test_factors_through_a_workspace(dtype: str, chunk_size: int) -> None:
    """The adapters' path: a forward given a workspace of ``factor_nbytes`` bytes (filled with NaN bits) writes its
    per-chunk factors there, every byte of it, and a backward that takes them back from it gives the outputs and
    gradients of the raw pair bit for bit. A workspace of another size is neither written nor read."""
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 150, 2, 64, 40, HV=4, dtype=dtype, seed=7,
                                                        use_qk_l2norm_in_kernel=True))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    _, res = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, chunk_size=chunk_size, backend="cuda")
    want = chunk_gated_delta_rule_bwd(res, do, dht)
    cc = str(cupy.cuda.Device().compute_capability)
    nbytes = cuda_chunk.factor_nbytes(kw["q"].shape, kw["v"].shape, kw["q"].dtype, chunk_size, True, cc)
    check_through_a_workspace(res, nbytes, lambda p, ws: cuda_chunk.factors_from_workspace(p, chunk_size, ws),
                              chunk_gated_delta_rule_bwd, want, do, dht)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sequence_ignores_the_tokens_after_it(dtype: str) -> None:
    """Packed sequences are independent: with NaN in every input of the second sequence, the first one's output,
    final state and gradients are those of running it alone, bit for bit. A chunk's tiles hold rows past its
    sequence's end (the Hopper pass's TMA boxes load the next sequence's rows there), which must not reach it."""
    import cupy

    L = 100  # a partial last chunk
    kw, do, dht = split_op_args(gated_delta_rule_inputs(1, 0, 2, 128, 64, HV=4, dtype=dtype, seed=11, seqlens=(L, 50),
                                                        use_qk_l2norm_in_kernel=True))
    per_token = ("q", "k", "v", "g", "beta")
    alone = {**kw, **{n: kw[n][:, :L] for n in per_token}, "initial_state": kw["initial_state"][:1],
             "cu_seqlens": kw["cu_seqlens"][:2]}
    poisoned = dict(kw)
    for n in per_token:
        poisoned[n] = kw[n].copy()
        poisoned[n][:, L:] = np.nan
    runs = []
    for args, d, dh in ((alone, do[:, :L], dht[:1]), (poisoned, do, dht)):
        (o, ht), res = chunk_gated_delta_rule_fwd(**to_device(args), output_final_state=True, chunk_size=64,
                                                  backend="cuda")
        grads = chunk_gated_delta_rule_bwd(res, cupy.asarray(d), cupy.asarray(dh))
        runs.append({"o": o[:, :L], "ht": ht[:1], **{f"d{n}": getattr(grads, n)[:, :L] for n in per_token},
                     "dh0": grads.initial_state[:1]})
    for name, want in runs[0].items():
        np.testing.assert_array_equal(to_host(want).view(np.uint8), to_host(runs[1][name]).view(np.uint8),
                                      err_msg=name)


def test_backward_takes_a_misaligned_do() -> None:
    """A do view 2 bytes off 16-byte alignment gives the gradients of an aligned do, bit for bit (the Hopper
    kernels, chosen by the forward's factors, load 16-byte rows: the backward copies such a do)."""
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 100, 2, 64, 64, dtype="bfloat16", seed=11,
                                                        use_qk_l2norm_in_kernel=True))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    (_, _), res = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, chunk_size=64, backend="cuda")
    shifted = cupy.zeros(do.size + 1, do.dtype)[1:].reshape(do.shape)
    shifted[...] = do
    assert shifted.data.ptr % 16 != 0
    aligned = chunk_gated_delta_rule_bwd(res, do, dht)
    misaligned = chunk_gated_delta_rule_bwd(res, shifted, dht)
    assert_same_bits(aligned, misaligned)


def test_backward_rejects_factors_of_another_chunk_size() -> None:
    import cupy

    kw, do, _ = split_op_args(gated_delta_rule_inputs(1, 50, 1, 16, 16, seed=8))
    kw, do = to_device(kw), cupy.asarray(do)
    (_, _), res16 = chunk_gated_delta_rule_fwd(**kw, chunk_size=16, backend="cuda")
    (_, _), res32 = chunk_gated_delta_rule_fwd(**kw, chunk_size=32, backend="cuda")
    with pytest.raises(ValueError, match="factors"):
        chunk_gated_delta_rule_bwd(res32._replace(saved=res16.saved), do)


def test_large_grid_many_sequences() -> None:
    """2,050 packed sequences of 16 tokens x 32 heads in one varlen call: grids are flat on x."""
    import cupy

    lens = [16] * 2050
    kw, do, dht = split_op_args(gated_delta_rule_inputs(1, 0, 32, 16, 16, seed=7, seqlens=lens))
    p = make_problem(**kw, output_final_state=True)
    o_ref, ht_ref = naive.recurrent_forward(p)
    grads_ref = naive.recurrent_backward(p, do, dht)
    (o, ht), res = chunk_gated_delta_rule_fwd(**to_device(kw), output_final_state=True, backend="cuda")
    assert_close("o", o_ref, o, dtype="float32")
    assert_close("ht", ht_ref, ht, dtype="float32")
    grads = chunk_gated_delta_rule_bwd(res, cupy.asarray(do), cupy.asarray(dht))
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        assert_close(grad_label(name), grads_ref[name], getattr(grads, name),
                     dtype="float32")


def test_cuda_chunk_matches_cuda_recurrent() -> None:
    """The two CUDA modes compute the same function (float32, shape with many chunks)."""
    import cupy

    kw, do, dht = split_op_args(gated_delta_rule_inputs(2, 200, 2, 64, 64, HV=4, seed=8))
    kw, do, dht = to_device(kw), cupy.asarray(do), cupy.asarray(dht)
    (o1, h1), r1 = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, backend="cuda")
    (o2, h2), r2 = fused_recurrent_gated_delta_rule_fwd(**kw, output_final_state=True, backend="cuda")
    assert_close("o", o2, o1, dtype="float32")
    assert_close("ht", h2, h1, dtype="float32")
    g1, g2 = chunk_gated_delta_rule_bwd(r1, do, dht), fused_recurrent_gated_delta_rule_bwd(r2, do, dht)
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        assert_close("d" + name, getattr(g2, name), getattr(g1, name), dtype="float32")


def run_with_options(monkeypatch: pytest.MonkeyPatch, options: ChunkOptions) -> None:
    """From now on the cuda chunked op (through its public functions) runs with `options`, not the defaults."""
    forward, backward = cuda_chunk.forward, cuda_chunk.backward
    monkeypatch.setattr(cuda_chunk, "forward", lambda p, workspace=None: forward(p, workspace, options))
    monkeypatch.setattr(cuda_chunk, "backward", lambda p, saved, do, dht: backward(p, saved, do, dht, options))


# (warpgroups per block, value columns per warpgroup, prefetch) of the state passes
_WG_CONFIGS = [(2, 32, False), (2, 32, True), (2, 16, False), (2, 16, True), (4, 32, True), (4, 16, True)]
_WG_CASES = [("K64_V48", {"B": 2, "T": 150, "H": 2, "HV": 4, "K": 64, "V": 48}),
             ("K128_varlen", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 128, "V": 136, "seqlens": (70, 0, 1, 128, 64)}),
             ("K256", {"B": 1, "T": 130, "H": 1, "HV": 1, "K": 256, "V": 64}),
             ("K120_V72_mha", {"B": 2, "T": 100, "H": 2, "HV": 2, "K": 120, "V": 72})]  # dq, dk finished in dqk


_WG_RUNS = ([(o[0], o[1:], c, "bfloat16") for o in CHUNK_OPTIONS for c in (_WG_CASES[0], _WG_CASES[3])]
            + [("g", ({}, {}, ()), c, dt) for c in _WG_CASES for dt in ("bfloat16", "float16")])


def _wg_config_fits(shape: dict[str, Any], config: tuple[int, int, bool]) -> bool:
    return shape["K"] <= 128 or (config[0] == 2 and config[1] == 16)  # K = 256: 2 x 16 columns only


_WG_PARAMS = [(r[1], r[2][1], r[3], cfg) for r in _WG_RUNS for cfg in _WG_CONFIGS if _wg_config_fits(r[2][1], cfg)]
_WG_IDS = [f"{r[0]}-{r[2][0]}-{r[3]}-wg{cfg[0]}x{cfg[1]}_{'pipe' if cfg[2] else 'single'}" for r in _WG_RUNS
           for cfg in _WG_CONFIGS if _wg_config_fits(r[2][1], cfg)]


@pytest.mark.parametrize(("option", "shape", "dtype", "config"), _WG_PARAMS, ids=_WG_IDS)
def test_hopper_forward_state_pass(option: tuple[dict[str, Any], dict[str, Any], tuple[str, ...]],
                                   shape: dict[str, Any], dtype: str, config: tuple[int, int, bool],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The wgmma kernels (the forward state pass, its recompute for the backward, the reverse pass and dq/dk)
    in each configuration of the state passes: warpgroups per block, value columns per warpgroup, single stage
    or prefetching; every option with grouped and ungrouped value heads (dq/dk per value head, or finished in
    the kernel), K = 64, 120, 128, 256, varlen with an empty sequence, V off the 64-column blocks."""
    if not wgmma_available():
        pytest.skip("the wgmma kernels need a compute capability 9.0 GPU")
    gen, extra, drop = option
    nwg, bvw, pipe = config
    run_with_options(monkeypatch, ChunkOptions(wg_config=config))
    launched = record_launches(monkeypatch)
    check_backend("cuda", make_inputs({**shape, **gen}, seed=9, dtype=dtype), device=True, drop=drop, mode="chunk",
                  chunk_size=64, **extra)
    tf = {False: "false", True: "true"}
    # the forward pass, beside prepare only where it prefetches with two warpgroups and prepare fits beside it
    # (always at 2 x 16 columns and K <= 128, which become one warpgroup of 32: _ahead_pass_config), then the
    # recompute for the backward as configured
    ahead = any(n.startswith("gdn_chunk_prepare_kernel<") and n.endswith(", true>") for n in launched)
    assert ahead <= (pipe and nwg == 2) and ahead >= (config == (2, 16, True) and shape["K"] <= 128), launched
    beside = (1, 32) if ahead and bvw == 16 and shape["K"] <= 128 else (nwg, bvw)
    for (w, c), store in ((beside, False), ((nwg, bvw), True)):
        assert any(n.startswith("gdn_chunk_fwd_wg_kernel<")
                   and n.endswith(f", {w}, {c}, {tf[store]}, {tf[pipe]}, {tf[ahead and not store]}>")
                   for n in launched), launched
    assert any(n.startswith("gdn_chunk_bwd_wg_kernel<") and n.endswith(f", {nwg}, {bvw}, {tf[pipe]}>")
               for n in launched), launched
    fuse = shape["HV"] == shape["H"] and shape["K"] <= 128
    assert any(n.startswith("gdn_chunk_bwd_dqk_wg_kernel<") and n.endswith(f", {tf[fuse]}>")
               for n in launched), launched


@pytest.mark.parametrize(("gen", "extra", "drop"), [o[1:] for o in CHUNK_OPTIONS], ids=[o[0] for o in CHUNK_OPTIONS])
def test_mma_sync_state_passes_on_hopper(gen: dict[str, Any], extra: dict[str, Any], drop: tuple[str, ...],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the wgmma path switched off, bf16 chunks of 64 run the mma.sync forward and reverse state passes and
    dq/dk kernel (what sm_80 runs), so a Hopper machine tests them too."""
    run_with_options(monkeypatch, ChunkOptions(wgmma=False))
    launched = record_launches(monkeypatch)
    check_backend("cuda", make_inputs({**_WG_CASES[0][1], **gen}, seed=10, dtype="bfloat16"), device=True,
                  drop=drop, mode="chunk", chunk_size=64, **extra)
    assert any(n.startswith("gdn_chunk_fwd_kernel<") for n in launched), launched
    assert any(n.startswith("gdn_chunk_bwd_state_kernel<") for n in launched), launched
    assert any(n.startswith("gdn_chunk_bwd_dqk_kernel<") for n in launched), launched
    assert not any("_wg_" in n for n in launched), launched


_AHEAD_CASES = [("K128_V128", {"B": 2, "T": 700, "H": 2, "HV": 4, "K": 128, "V": 128}, "bfloat16"),
                ("K64_V48_l2_gate", {"B": 2, "T": 150, "H": 2, "HV": 4, "K": 64, "V": 48,
                                     "use_qk_l2norm_in_kernel": True, "use_gate_in_kernel": True}, "float16"),
                ("K128_varlen", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 128, "V": 136,
                                 "seqlens": (70, 0, 1, 128, 64, 700)}, "bfloat16"),
                ("many_sequences", {"B": 1, "T": 0, "H": 4, "K": 64, "V": 64, "seqlens": (16,) * 300 + (900, 0)},
                 "bfloat16"),
                ("T1", {"B": 3, "T": 1, "H": 2, "K": 64, "V": 64}, "bfloat16")]


# the two-warpgroup pass prepare runs before, and the pass beside it (warpgroups, columns each): at 2 x 32
# columns prepare fits beside the pass at K = 64 only (registers)
_AHEAD_PASSES = {"2x16": ((2, 16, True), (1, 32)), "2x32": ((2, 32, True), (2, 32))}
_AHEAD_PARAMS = [pytest.param(c[1], c[2], _AHEAD_PASSES[p], id=f"{c[0]}-{p}") for c in _AHEAD_CASES
                 for p in _AHEAD_PASSES if p == "2x16" or c[1]["K"] <= 64]


@pytest.mark.parametrize(("shape", "dtype", "passes"), _AHEAD_PARAMS)
def test_prepare_ahead_of_the_forward_pass(shape: dict[str, Any], dtype: str,
                                           passes: tuple[tuple[int, int, bool], tuple[int, int]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare running beside the Hopper forward pass (persistent blocks publishing each chunk; the pass's
    producer warp waiting on them) gives the output, the final state and the factors the backward takes of
    prepare run before the pass, bit for bit; sequences of different lengths, empty ones and T = 1 included.
    Beside prepare, two warpgroups of 16 columns become one of 32 (``cuda_chunk_hopper.ahead_pass_config``)."""
    if not wgmma_available():
        pytest.skip("the wgmma kernels need a compute capability 9.0 GPU")
    kw, _, _ = split_op_args(make_inputs(shape, seed=11, dtype=dtype))
    p = make_problem("chunk", **to_device(kw), output_final_state=True, chunk_size=64, backend="cuda")
    before, beside = passes
    launched = record_launches(monkeypatch)
    runs = []
    for ahead in (True, False):
        del launched[:]
        o, ht, f = cuda_chunk.chunk_forward(p, 64, options=ChunkOptions(prepare_ahead=ahead, wg_config=before))
        runs.append([to_host(x) for x in (o, ht, f.Ahi, f.Phi, f.Gc, f.Bc, f.Rq, f.Rk) if x is not None])
        assert any(n.startswith("gdn_chunk_prepare_kernel<") and n.endswith(f", {'true' if ahead else 'false'}>")
                   for n in launched), launched
        nwg, bvw = beside if ahead else before[:2]
        assert any(n.startswith("gdn_chunk_fwd_wg_kernel<") and n.endswith(f", {nwg}, {bvw}, false, true, "
                                                                           f"{'true' if ahead else 'false'}>")
                   for n in launched), launched
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
