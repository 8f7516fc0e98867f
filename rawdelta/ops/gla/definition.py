"""GLA's ops, declared once: ``fused_recurrent_gla``, ``chunk_gla`` and ``fused_chunk_gla``.

Everything public about them (the functions, their validation, the torch and JAX entry points, ``rawdelta check``,
``rawdelta bench`` and the contract tests) is derived from the declarations below (``rawdelta/ops/common/opdef.py``
says how). The math is in README.md beside this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..common.numba_device import MAX_K
from ..common.opdef import (
    KEYWORD_ONLY,
    Array,
    Backend,
    BenchSpec,
    CheckCase,
    Family,
    OpCase,
    OpDef,
    Option,
    Output,
    Reference,
)
from ..common.problem import Problem

_PKG = "rawdelta.ops.gla"
CHUNK_SIZES = (16, 32, 64)


def peer_chunk_size(T: int) -> int:
    """The chunk size the peer's ``chunk_gla`` takes for T tokens (the packed length with ``cu_seqlens``): the next
    power of two of T, clamped to ``[16, 64]``."""
    return min(64, max(16, 1 << max(T - 1, 0).bit_length()))


class GLAProblem(Problem):
    """A validated GLA call (:class:`~rawdelta.ops.common.problem.Problem`), with the family's shapes: q, k, g, gk
    ``[B, T, H, K]``; v, gv ``[B, T, H, V]``; initial_state ``[N, H, K, V]``. A chunked call's ``chunk_size`` of
    None is resolved here to the peer's choice (:func:`peer_chunk_size` of T)."""

    def __init__(self, **attrs: Any) -> None:
        if "chunk_size" in attrs and attrs["chunk_size"] is None:
            attrs["chunk_size"] = peer_chunk_size(attrs["T"])
        super().__init__(**attrs)


FAMILY = Family(
    name="gla",
    title="GLA",
    grads_name="GLAGrads",
    grads_doc=("Gradients of a GLA call; None where the input was None or the op does not take it (g in the recurrent "
               "mode, gk and gv in the chunked ones).\n\nEach has the shape and dtype of its input, except "
               "``initial_state`` (dh0), which is float32."),
    arrays=(
        Array("q", ("B", "T", "H", "K"), "queries", required=True),
        Array("k", ("B", "T", "H", "K"), "keys, same dtype as q", required=True),
        Array("v", ("B", "T", "H", "V"), "values, same dtype as q (one value head per key head)", required=True),
        Array("g", ("B", "T", "H", "K"), "per-key log-decay (natural log, <= 0)", required=True, float32=True,
              gate=True),
        Array("gk", ("B", "T", "H", "K"), "per-key log-decay (natural log, <= 0)", float32=True, gate=True,
              absent="no decay"),
        Array("gv", ("B", "T", "H", "V"), "per-value log-decay (natural log, <= 0)", float32=True, gate=True,
              absent="no decay"),
        Array("initial_state", ("N", "H", "K", "V"), "the state each sequence starts from", float32=True,
              state=True, absent="zeros"),
    ),
    problem=GLAProblem,
    check=None,
    inputs=f"{_PKG}.inputs:gla_inputs",
)

_OUTPUTS = (
    Output("o", ("B", "T", "H", "V"), "v"),
    Output("final_state", ("N", "H", "K", "V"), None),
)
_LIMITS = {"numba": {"K": (MAX_K, "a state column lives in a thread's local array")}}
_CASTS = ("Non-contiguous inputs are copied; the gates and initial_state are read as float32 (copied when given in "
          "another dtype).")
_CHUNK_SIZE = Option("chunk_size", None, "int | None",
                     "tokens per chunk, one of (16, 32, 64); None takes the peer's choice from T.")

# The contract tests' shapes: awkward sizes (T = 1, K != V, varlen with an empty sequence, no initial state), each
# with the inputs that exercise it; the chunked ops add shapes that cross chunks, the recurrent one its gate sets. The
# first adapter case is dense (the adapters' tests call it without cu_seqlens or a chunk size).
_ADAPTER_DENSE = OpCase("adapter_dense", {"B": 2, "T": 4, "H": 2, "K": 3, "V": 2}, adapters=True)
_ADAPTER_VARLEN = OpCase("adapter_varlen_empty", {"B": 1, "T": 0, "H": 1, "K": 3, "V": 2, "seqlens": (3, 0, 2)},
                         adapters=True)
_SHAPES = (
    OpCase("T1", {"B": 2, "T": 1, "H": 2, "K": 4, "V": 4}),
    OpCase("K_gt_V", {"B": 1, "T": 6, "H": 1, "K": 8, "V": 3}),
    OpCase("K_lt_V", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 8}),
    OpCase("no_h0", {"B": 2, "T": 5, "H": 1, "K": 4, "V": 4, "initial_state": False}),
    OpCase("varlen_empty", {"B": 1, "T": 0, "H": 2, "K": 4, "V": 3, "seqlens": (3, 0, 4, 1)}, simulator=True),
)
_RECURRENT_CASES = (
    OpCase("adapter_dense_gk_gv", {**_ADAPTER_DENSE.params, "gv": True}, adapters=True),
    _ADAPTER_VARLEN,
    *_SHAPES,
    OpCase("gk_gv", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 5, "gv": True}, simulator=True),
    OpCase("gv_only", {"B": 2, "T": 4, "H": 1, "K": 3, "V": 4, "gk": False, "gv": True}),
    OpCase("no_gate", {"B": 1, "T": 5, "H": 2, "K": 3, "V": 2, "gk": False}),
)
_CHUNK_CROSSING = (
    OpCase("T_off_chunk", {"B": 2, "T": 37, "H": 1, "K": 8, "V": 5}, {"chunk_size": 16}, simulator=True),
    OpCase("adapter_crosses_chunk", {"B": 1, "T": 20, "H": 1, "K": 2, "V": 2}, {"chunk_size": 16}, adapters=True),
)
_CHUNK_CASES = (_ADAPTER_DENSE, _ADAPTER_VARLEN, *_SHAPES, *_CHUNK_CROSSING,
                OpCase("varlen_crossing", {"B": 1, "T": 0, "H": 2, "K": 6, "V": 7, "seqlens": (17, 0, 33, 1, 16)},
                       {"chunk_size": 16}),
                OpCase("peer_chunk_crossing", {"B": 1, "T": 70, "H": 1, "K": 3, "V": 2}))  # None: 64 for T = 70
# The fused chunked op runs the same stages on the CPU backends: the adapters' cases and the shapes that cross chunks.
_FUSED_CHUNK_CASES = (_ADAPTER_DENSE, _ADAPTER_VARLEN, *_CHUNK_CROSSING)

_CHUNK_BENCH = {"gk": False}  # the chunked ops take the gate as g
_RECURRENT_BENCH = {"g": False}

RECURRENT = OpDef(
    name="fused_recurrent_gla",
    family=FAMILY,
    mode="recurrent",
    signature=("q", "k", "v", "gk", "gv", "scale", "initial_state", "output_final_state", "reverse", "cu_seqlens",
               KEYWORD_ONLY, "state_v_first", "transpose_state_layout", "inplace_final_state", "cu_seqlens_cpu",
               "backend", "stream"),
    options=(Option("reverse", False, "bool",
                    "scan each sequence from its last token to its first (the state starts at ``initial_state`` "
                    "before the last token; the final state is the state after the first). Default: ``False``."),),
    outputs=_OUTPUTS,
    summary="Gated linear attention, one token at a time (decoding, short sequences), with a backward.",
    doc=("Per sequence and head, with state ``S`` ``[K, V]`` (float32)::\n\n"
         "    S   = exp(gk_t)[:, None] * S * exp(gv_t)[None, :] + k_t v_t^T\n"
         "    o_t = S^T (scale * q_t)\n\n"
         "An absent gate decays nothing; a gate of ``-inf`` in some elements zeroes those rows (gk) or columns (gv) "
         "of the state. " + _CASTS + " No input is modified unless ``inplace_final_state=True``."),
    backends={"numpy": Backend(f"{_PKG}.naive"), "numba": Backend(f"{_PKG}.numba_ref"),
              "cuda": Backend(f"{_PKG}.cuda_recurrent")},
    limits={**_LIMITS, "cuda": {"K": (256, "a state column lives in a warp's registers")}},
    naive=(Reference("naive_recurrent_gla",
                     ("q", "k", "v", "gk", "initial_state", "output_final_state", KEYWORD_ONLY, "gv", "scale",
                      "reverse", "cu_seqlens"),
                     "Float64 reference of :func:`~rawdelta.fused_recurrent_gla` on host arrays (the peer's "
                     "reference order: gk, then initial_state)."),),
    check_cases=(
        CheckCase("dense", {"B": 2, "T": 13, "H": 2, "K": 8, "V": 12, "gv": True, "seed": 7}),
        CheckCase("varlen", {"B": 1, "T": 13, "H": 2, "K": 8, "V": 12, "seqlens": (5, 0, 8), "seed": 8}),
    ),
    cases=_RECURRENT_CASES,
    bench=BenchSpec(("forward", "forward+backward", "decode"), "gla_recurrent", _RECURRENT_BENCH,
                    peer="fla.ops.gla:fused_recurrent_gla"),
    residuals_doc="The residuals hold the validated inputs only; the backward recomputes the states.",
)

_CHUNK_SIGNATURE = ("q", "k", "v", "g", "scale", "initial_state", "output_final_state", "cu_seqlens", KEYWORD_ONLY,
                    "chunk_size", "state_v_first", "transpose_state_layout", "cu_seqlens_cpu", "backend", "stream")
_CHUNK_DOC = (
    "Computes the function of :func:`~rawdelta.fused_recurrent_gla` with ``gk = g`` and no gv (README.md beside the "
    "op's source has the math): per sequence and head, state ``S`` ``[K, V]`` float32, "
    "``S = exp(g_t)[:, None] * S + k_t v_t^T``, ``o_t = S^T (scale q_t)``, evaluated in chunks of ``chunk_size`` "
    "tokens: the gate folded into q and k through its chunk-local cumsum, the inter-chunk part through the state at "
    "each chunk's start, the intra-chunk part through causal decayed scores. ``chunk_size=None`` takes the peer's "
    "choice, the next power of two of T (the packed length with ``cu_seqlens``) clamped to [16, 64].\n\n")

CHUNK = OpDef(
    name="chunk_gla",
    family=FAMILY,
    mode="chunk",
    signature=_CHUNK_SIGNATURE,
    options=(_CHUNK_SIZE,),
    outputs=_OUTPUTS,
    summary="Gated linear attention computed chunk by chunk (training, prefill), with a backward.",
    doc=_CHUNK_DOC + _CASTS + " No input is modified.",
    backends={"numpy": Backend(f"{_PKG}.naive_chunk"), "numba": Backend(f"{_PKG}.numba_chunk"),
              "cuda": Backend(f"{_PKG}.cuda_chunk")},
    chunk_sizes=CHUNK_SIZES,
    limits={**_LIMITS, "cuda": {"K": (256, "the state passes hold K x BV state tiles of at most 256 keys")}},
    reference=RECURRENT.name,
    reference_args={"g": "gk"},
    naive=(Reference("naive_chunk_gla",
                     ("q", "k", "v", "g", "initial_state", "output_final_state", KEYWORD_ONLY, "chunk_size", "scale",
                      "cu_seqlens"),
                     "Float64 chunked reference of :func:`~rawdelta.chunk_gla` on host arrays."),),
    check_cases=(
        CheckCase("varlen", {"B": 1, "T": 21, "H": 2, "K": 8, "V": 12, "seqlens": (5, 0, 16), "seed": 9},
                  {"chunk_size": 16}),
    ),
    cases=_CHUNK_CASES,
    bench=BenchSpec(("forward", "forward+backward"), "gla_chunk", _CHUNK_BENCH, peer="fla.ops.gla:chunk_gla"),
    residuals_doc=("The residuals hold the validated inputs and, from the cuda backend, prepare's per-token factors "
                   "(``q 2^G``, ``k 2^(G_last - G)``, the scaled intra-chunk scores as hi + lo 16-bit parts, the "
                   "row codes) and each chunk's per-key decay; the backward recomputes the per-chunk states."),
)

# chunk_gla's declaration but for what tells the two apart: the same function, its own name, cases and peer.
FUSED_CHUNK = dataclasses.replace(
    CHUNK,
    name="fused_chunk_gla",
    summary="Gated linear attention chunk by chunk in one pass per sequence (no per-chunk state buffer).",
    doc=(_CHUNK_DOC + "The same function as :func:`~rawdelta.chunk_gla`, on the same stages on the numpy and numba "
         "backends. " + _CASTS + " No input is modified."),
    naive=(),
    backends={"numpy": Backend(f"{_PKG}.naive_chunk"), "numba": Backend(f"{_PKG}.numba_chunk"),
              "cuda": Backend(f"{_PKG}.cuda_fused_chunk")},
    limits={**_LIMITS, "cuda": {"K": (128, "one block holds the whole K x V state in registers"),
                                "V": (128, "one block holds the whole K x V state in registers")}},
    check_cases=(
        CheckCase("dense", {"B": 2, "T": 21, "H": 1, "K": 8, "V": 4, "seed": 10}, {"chunk_size": 16}),
    ),
    cases=_FUSED_CHUNK_CASES,
    bench=BenchSpec(("forward", "forward+backward"), "gla_chunk", _CHUNK_BENCH, peer="fla.ops.gla:fused_chunk_gla"),
    residuals_doc="The residuals hold the validated inputs; the backward recomputes the chunk states.",
)
