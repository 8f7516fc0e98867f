"""chunk_gla's cuda backend on the host: the bound on H K chunk_size that prepare's 32-bit offsets need, the Hopper
reverse pass's shared memory with the scores' lo part in its stages, the dq/dk/dg kernel's shared memory against its
two blocks per SM, and the layout of the workspace (the adapters keep the forward's prepare outputs and each chunk's
start state in it for the backward): the size ``workspace_nbytes`` gives before a call is what the cuda backend
carves those arrays from, packed without gaps, 16-byte aligned (the Hopper passes' TMA tiles), the states' room a
bound on the chunks of any varlen split (``max_chunks``). Their use on the GPU:
``tests/ops/test_gla_chunk_cuda.py::test_factors_kept_and_through_a_workspace`` and the adapters' GPU tests."""

from __future__ import annotations

import numpy as np
import pytest

from rawdelta.cuda.launch import CTYPES
from rawdelta.ops.common.chunk_table import max_chunks
from rawdelta.ops.common.workspace import field_arrays
from rawdelta.ops.gla import cuda_chunk
from rawdelta.ops.gla.definition import peer_chunk_size

B, T, H, K, V = 2, 70, 3, 40, 24


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [16, 64, None])
@pytest.mark.parametrize("seqs", [None, 5], ids=["equal", "varlen"])
def test_workspace_arrays_tile_a_workspace_of_workspace_nbytes(dtype: str, chunk_size: int | None,
                                                              seqs: int | None) -> None:
    dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(cuda_chunk.BFLOAT16)
    bt = chunk_size or peer_chunk_size(T)
    b, shapes = (B, {"q": (B, T, H, K), "v": (B, T, H, V)})
    if seqs is not None:  # varlen: one row of B T tokens in `seqs` sequences
        b, shapes = 1, {"q": (1, B * T, H, K), "v": (1, B * T, H, V), "cu_seqlens": (seqs + 1,)}
    n_tok = B * T
    nbytes = cuda_chunk.workspace_nbytes(shapes, dt, {"chunk_size": chunk_size}, "90")
    assert cuda_chunk.workspace_nbytes(shapes, dt, {"chunk_size": chunk_size}, None) == 0
    ws = np.zeros(nbytes, np.uint8)
    states = max_chunks(b, n_tok // b, bt, seqs)
    fields = cuda_chunk._factor_fields(n_tok, H, K, V, bt, CTYPES[dt], dt, states)
    arrays = field_arrays(fields, ws)
    assert arrays is not None
    assert set(arrays) == {"hbuf", "Ahi", "Alo", "qg", "kg", "Rc"}  # the scores split for every type (the reverse pass)
    assert arrays["hbuf"].size >= states * H * K * V
    spans = []
    for name, a in arrays.items():
        shape = {"Rc": (n_tok, H), "qg": (n_tok, H, K), "kg": (n_tok, H, K)}.get(name, (n_tok, H, bt))
        assert name == "hbuf" or a.shape == shape, name
        assert np.shares_memory(a, ws), name
        start = a.__array_interface__["data"][0] - ws.__array_interface__["data"][0]
        assert start % (16 if name != "Rc" else 4) == 0, name
        spans.append((start, start + a.nbytes))
    spans.sort()
    # packed without gaps: the forward writes every byte, so the workspace is a deterministic output
    assert spans[0][0] == 0 and spans[-1][1] == nbytes
    assert all(end == nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "workspace arrays overlap or leave gaps"
    assert field_arrays(fields, np.zeros(nbytes + 16, np.uint8)) is None


@pytest.mark.gpu
def test_fresh_arrays_are_one_allocation() -> None:
    """Without a workspace a call's factors, per-chunk decays and chunk table are carved out of one device
    allocation (one call into a framework's allocator rather than one per array), each at a 256-byte boundary as a
    lone allocation's would be, and the float ones NaN while allocations are poisoned (the autouse fixture), as
    :func:`rawdelta._arrays.empty`'s are."""
    from rawdelta.ops.common.chunk_table import chunk_table_fields
    from rawdelta.ops.common.workspace import FRESH_ALIGN

    dt = np.dtype(np.float32)
    fields = (cuda_chunk._factor_fields(70, 3, 40, 24, 16, CTYPES[dt], dt, 5)
              + [("Dk", (5, 3, 40), dt), *chunk_table_fields(2, 5)])
    arrays = field_arrays(fields, None)
    assert list(arrays) == [name for name, _, _ in fields]
    assert len({id(a.data.mem) for a in arrays.values()}) == 1
    for (name, shape, dtype), a in zip(fields, arrays.values()):
        assert a.dtype == dtype and (name == "hbuf" or a.shape == shape), name
        assert a.data.ptr % FRESH_ALIGN == 0, name
        assert dtype.kind != "f" or bool(np.isnan(a.get()).all()), name
    ends = sorted((a.data.ptr, a.data.ptr + a.nbytes) for a in arrays.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ends, ends[1:])), "carved arrays overlap"


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_max_chunks_bounds_every_split_of_the_tokens(chunk_size: int) -> None:
    """The states' room of a varlen workspace, sized before the call from the token and sequence counts alone, holds
    the chunks of every split of the tokens into that many sequences (empty ones too); without varlen it is exact."""
    rng = np.random.default_rng(0)
    assert max_chunks(3, 130, chunk_size) == 3 * -(-130 // chunk_size)
    for n_tok in (1, 63, 64, 65, 500):
        for n_seqs in (1, 2, 7, 40):
            bound = max_chunks(1, n_tok, chunk_size, n_seqs)
            worst = sum(-(-length // chunk_size) for length in _worst_split(n_tok, n_seqs))
            assert worst == bound, (n_tok, n_seqs)
            for _ in range(20):
                cuts = np.sort(rng.integers(0, n_tok + 1, n_seqs - 1))
                lengths = np.diff(np.concatenate([[0], cuts, [n_tok]]))
                assert sum(-(-int(n) // chunk_size) for n in lengths) <= bound


def _worst_split(n_tok: int, n_seqs: int) -> list[int]:
    """A split of n_tok tokens into n_seqs sequences with the most chunks: one token in each of the first n_seqs - 1
    (while tokens last), the rest in the last: (n_seqs - 1) + ceil((n_tok - n_seqs + 1) / chunk_size) chunks, which
    is (n_tok + n_seqs (chunk_size - 1)) // chunk_size (or n_tok, with fewer tokens than sequences)."""
    singles = [1 if i < n_tok else 0 for i in range(n_seqs - 1)]
    return [*singles, n_tok - sum(singles)]


def test_every_hopper_reverse_pass_fits_a_block() -> None:
    """Each configuration the host can pick (gated_delta_rule.cuda_chunk_hopper.wg_config's warpgroups, columns and
    prefetch) fits one block's shared memory with the scores' lo part in each stage."""
    from rawdelta.ops.common.cuda_smem import SMEM_LIMIT
    from rawdelta.ops.gated_delta_rule.cuda_chunk_kernels import wg_bvw_options

    for kp in cuda_chunk.KP_SIZES:
        configs = [(2, bvw) for bvw in wg_bvw_options(kp)] + ([(4, 16), (4, 32)] if kp <= 128 else [])
        for nwg, bvw in configs:
            for pipe in (False, True):
                nbytes = cuda_chunk.bwd_wg_smem(kp, nwg * bvw, pipe)
                assert nbytes <= SMEM_LIMIT, (kp, nwg, bvw, pipe, nbytes)


def test_dqk_kernel_keeps_two_blocks_per_sm() -> None:
    """The dq/dk/dg kernel's registers are bounded for two blocks per SM (``__launch_bounds__(256, 2)``); its shared
    memory (with the V loop's tiles in two stages for 16-bit inputs) must let two blocks share an H100's SM, with the
    1 KB static and the 1 KB the driver reserves per block, or the bound would only cost spills."""
    from rawdelta.ops.gla.cuda_chunk_dqk import dqk_smem

    for ct in CTYPES.values():
        for bt in (16, 32, 64):
            assert 2 * (dqk_smem(ct, bt) + 2048) <= cuda_chunk.SM_SMEM, (ct, bt, dqk_smem(ct, bt))



class _Launched(Exception):
    pass


def _no_launch(*args: object) -> None:
    raise _Launched


@pytest.mark.parametrize(("heads", "ok"), [(2**31 // (256 * 64) - 1, True), (2**31 // (256 * 64), False)])
def test_prepare_refuses_chunks_past_32_bit_offsets(heads: int, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare stores a chunk's rows [BT, H, K] at 32-bit offsets from its first element: refused before any launch
    monkeypatch.setattr(cuda_chunk, "_Chunks", _no_launch)
    p = type("P", (), {"H": heads, "K": 256})()
    with pytest.raises(_Launched if ok else ValueError, match=None if ok else r"H \* K \* chunk_size < 2\*\*31"):
        cuda_chunk.prepare(p, 64)
