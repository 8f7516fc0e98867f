"""The gated delta rule's ops, declared once: ``fused_recurrent_gated_delta_rule`` and ``chunk_gated_delta_rule``.

Everything public about them (the functions, their validation, the torch and JAX entry points, ``rawdelta check``,
``rawdelta bench`` and the contract tests) is derived from the declarations below (``rawdelta/ops/common/opdef.py``
says how). The math is in README.md beside this file.
"""

from __future__ import annotations

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
from ..common.validation import Check

_PKG = "rawdelta.ops.gated_delta_rule"


class GDNProblem(Problem):
    """A validated gated-delta-rule call (:class:`~rawdelta.ops.common.problem.Problem`), with the family's shapes:
    q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV]``; gk ``[B, T, HV, K]``; gv ``[B, T, HV, V]``;
    beta ``[B, T, HV]`` or ``[B, T, HV, V]``; initial_state ``[N, HV, K, V]``; A_log, dt_bias ``[HV]``."""

    @property
    def beta_per_v(self) -> bool:
        """beta is given per value dimension, ``[B, T, HV, V]``."""
        return self.beta is not None and self.beta.ndim == 4


def _check(c: Check) -> None:
    """The gated delta rule's own rules: grouped value heads, the in-kernel gate and beta options, and what the
    chunked mode does not take."""
    a, d, o = c.arrays, c.dims, c.options
    if "H" in d and "HV" in d and d["HV"] % d["H"] != 0:
        c.error(f"the number of value heads HV={d['HV']} must be a multiple of the key heads H={d['H']} "
                f"(v is [B, T, HV, V], q and k are [B, T, H, K])")
    if c.op.mode == "chunk" and a.get("beta") is not None and a["beta"].ndim == 4:
        c.not_supported("beta of shape [B, T, HV, V] (per value dimension) is only supported by the recurrent mode")
    if o["use_gate_in_kernel"]:
        if a.get("A_log") is None:
            c.error("use_gate_in_kernel=True needs A_log [HV]")
        if a.get("g") is None:
            c.error("use_gate_in_kernel=True needs the raw gate g [B, T, HV]")
    elif a.get("A_log") is not None or a.get("dt_bias") is not None:
        c.error("A_log / dt_bias are only used with use_gate_in_kernel=True")
    if o["allow_neg_eigval"] and not o["use_beta_sigmoid_in_kernel"]:
        c.error("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")


FAMILY = Family(
    name="gated_delta_rule",
    title="Gated delta rule",
    grads_name="GatedDeltaRuleGrads",
    grads_doc=(
        "Gradients of a gated-delta-rule call; None where the input was None or the op does not take it (gk and gv "
        "in the chunked mode).\n\nEach has the shape and dtype of its input, except ``initial_state`` (dh0), which "
        "is float32. ``dq`` and ``dk`` are summed over the value heads sharing each key head. With "
        "``use_qk_l2norm_in_kernel``, ``use_beta_sigmoid_in_kernel`` or ``use_gate_in_kernel`` the gradients are "
        "taken w.r.t. the raw inputs (before the normalisation, the sigmoid, the gate activation)."),
    arrays=(
        Array("q", ("B", "T", "H", "K"), "queries", required=True),
        Array("k", ("B", "T", "H", "K"), "keys, same dtype as q", required=True),
        Array("v", ("B", "T", "HV", "V"), "values, same dtype as q; ``HV % H == 0`` (value head hv uses key head "
              "``hv // (HV // H)``)", required=True),
        Array("g", ("B", "T", "HV"), "scalar log-decay (natural log, <= 0), or the raw gate with "
              "``use_gate_in_kernel``", float32=True, gate=True, absent="no decay"),
        Array("gk", ("B", "T", "HV", "K"), "per-key log-decay", float32=True, gate=True, absent="no decay"),
        Array("gv", ("B", "T", "HV", "V"), "per-value log-decay", float32=True, gate=True, absent="no decay"),
        Array("beta", ("B", "T", "HV"), "the delta rule's step size (logits with ``use_beta_sigmoid_in_kernel``); "
              "per value dimension in the recurrent mode only", float32=True, alt_shape=("B", "T", "HV", "V"),
              absent="ones"),
        Array("initial_state", ("N", "HV", "K", "V"), "the state each sequence starts from", float32=True,
              state=True, absent="zeros"),
        Array("A_log", ("HV",), "log decay rate of the in-kernel gate", float32=True),
        Array("dt_bias", ("HV",), "bias of the in-kernel gate", float32=True, absent="zeros"),
    ),
    problem=GDNProblem,
    check=_check,
    inputs=f"{_PKG}.inputs:gated_delta_rule_inputs",
)

_FLAGS = (
    Option("use_qk_l2norm_in_kernel", False, "bool",
           "L2-normalise q and k per head (eps 1e-6 inside the sqrt). Default: ``False``."),
    Option("use_gate_in_kernel", False, "bool",
           "the gate is ``g = -exp(A_log) * softplus(g_raw + dt_bias)``. Default: ``False``."),
    Option("use_beta_sigmoid_in_kernel", False, "bool", "beta holds logits; ``beta = sigmoid(beta)``. "
           "Default: ``False``."),
    Option("allow_neg_eigval", False, "bool", "with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``."),
)
_OUTPUTS = (
    Output("o", ("B", "T", "HV", "V"), "v"),
    Output("final_state", ("N", "HV", "K", "V"), None),
)
_LIMITS = {"cuda": {"K": (256, "a state column or a chunk's key tile must fit on chip")}}
_CASTS = ("Non-contiguous inputs are copied; the gates, beta, A_log, dt_bias and initial_state are read as float32 "
          "(copied when given in another dtype).")

# The contract tests' shapes: awkward sizes (T = 1, K != V, grouped heads, varlen with empty sequences, no initial
# state), each with the inputs that exercise it; the chunked op adds shapes that cross chunks.
_SHAPES = (
    OpCase("grouped_2x", {"B": 2, "T": 4, "H": 1, "HV": 2, "K": 4, "V": 3}, simulator=True),
    OpCase("T1", {"B": 2, "T": 1, "H": 2, "K": 4, "V": 4}),
    OpCase("K_gt_V", {"B": 1, "T": 6, "H": 1, "K": 8, "V": 3}),
    OpCase("no_h0", {"B": 2, "T": 5, "H": 1, "K": 4, "V": 4, "initial_state": False}),
    OpCase("varlen_empty", {"B": 1, "T": 0, "H": 2, "K": 4, "V": 3, "seqlens": (3, 0, 4, 1)}, simulator=True),
    OpCase("varlen_no_h0", {"B": 1, "T": 0, "H": 1, "K": 4, "V": 3, "seqlens": (2, 1, 0, 3),
                            "initial_state": False}),
    OpCase("adapter_g_beta", {"B": 2, "T": 4, "H": 2, "K": 3, "V": 2}, adapters=True),
    OpCase("adapter_l2norm_sigmoid_gate", {"B": 1, "T": 4, "H": 1, "K": 3, "V": 2, "use_qk_l2norm_in_kernel": True,
                                           "use_beta_sigmoid_in_kernel": True, "use_gate_in_kernel": True},
           {"allow_neg_eigval": True}, adapters=True),
    OpCase("adapter_varlen_empty", {"B": 1, "T": 0, "H": 1, "K": 3, "V": 2, "seqlens": (3, 0, 2)}, adapters=True),
    OpCase("adapter_grouped", {"B": 1, "T": 3, "H": 1, "HV": 2, "K": 3, "V": 2}, adapters=True),
)
_RECURRENT_CASES = _SHAPES + (
    OpCase("grouped_3x_gk", {"B": 1, "T": 5, "H": 2, "HV": 6, "K": 3, "V": 4, "gk": True}),
    OpCase("K_lt_V_gv", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 8, "gv": True}, simulator=True),
    OpCase("varlen_every_gate", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 4, "V": 3, "seqlens": (0, 5, 0), "gk": True,
                                 "gv": True, "beta_per_v": True}),
    OpCase("adapter_gk_gv_beta_per_v", {"B": 1, "T": 4, "H": 1, "K": 3, "V": 2, "g": False, "gk": True, "gv": True,
                                        "beta_per_v": True}, adapters=True),
)
_CHUNK_CASES = _SHAPES + (
    OpCase("grouped_3x", {"B": 1, "T": 5, "H": 2, "HV": 6, "K": 3, "V": 4}),
    OpCase("K_lt_V", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 8}),
    OpCase("T_off_chunk", {"B": 2, "T": 37, "H": 1, "HV": 2, "K": 8, "V": 5}, {"chunk_size": 16}, simulator=True),
    OpCase("varlen_crossing", {"B": 1, "T": 0, "H": 2, "K": 6, "V": 7, "seqlens": (17, 0, 33, 1, 16)},
           {"chunk_size": 16}),
    OpCase("adapter_crosses_chunk", {"B": 1, "T": 20, "H": 1, "K": 2, "V": 2}, {"chunk_size": 16}, adapters=True),
    OpCase("adapter_varlen_crosses_chunk", {"B": 1, "T": 0, "H": 1, "K": 2, "V": 2, "seqlens": (17, 0, 3)},
           {"chunk_size": 16}, adapters=True),
)
_BENCH_INPUTS = {"use_qk_l2norm_in_kernel": True}

RECURRENT = OpDef(
    name="fused_recurrent_gated_delta_rule",
    family=FAMILY,
    mode="recurrent",
    signature=("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel",
               "cu_seqlens", KEYWORD_ONLY, "gk", "gv", "use_gate_in_kernel", "A_log", "dt_bias",
               "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "state_v_first", "transpose_state_layout",
               "inplace_final_state", "cu_seqlens_cpu", "backend", "stream"),
    options=_FLAGS,
    outputs=_OUTPUTS,
    summary="Gated delta rule, one token at a time (decoding, short sequences), with a backward.",
    doc=("Per sequence and value head, with state ``S`` ``[K, V]`` (float32)::\n\n"
         "    S~  = S * exp(g_t) * exp(gk_t)[:, None] * exp(gv_t)[None, :]\n"
         "    d_t = beta_t * (v_t - S~^T k_t)\n"
         "    S   = S~ + k_t d_t^T\n"
         "    o_t = S^T (scale * q_t)\n\n" + _CASTS + " No input is modified unless ``inplace_final_state=True``."),
    backends={"numpy": Backend(f"{_PKG}.naive"), "numba": Backend(f"{_PKG}.numba_ref"),
              "cuda": Backend(f"{_PKG}.cuda_recurrent")},
    limits=_LIMITS,
    naive=(Reference("naive_recurrent_gated_delta_rule",
                     ("q", "k", "v", "beta", "g", "scale", "initial_state", "output_final_state", KEYWORD_ONLY, "gk",
                      "gv", "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "A_log", "dt_bias",
                      "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "cu_seqlens"),
                     "Float64 reference of :func:`~rawdelta.fused_recurrent_gated_delta_rule` on host arrays "
                     "(**beta before g**, as in the peer's reference)."),),
    check_cases=(
        CheckCase("dense", {"B": 2, "T": 13, "H": 2, "HV": 4, "K": 8, "V": 12, "seed": 7}),
        CheckCase("varlen", {"B": 1, "T": 13, "H": 2, "HV": 4, "K": 8, "V": 12, "seqlens": (5, 0, 8), "seed": 8}),
    ),
    cases=_RECURRENT_CASES,
    bench=BenchSpec(("forward", "forward+backward", "decode"), "gdn_recurrent", _BENCH_INPUTS,
                    peer="fla.ops.gated_delta_rule:fused_recurrent_gated_delta_rule"),
    residuals_doc="The residuals hold the validated inputs only; the backward recomputes the states from checkpoints.",
)

CHUNK = OpDef(
    name="chunk_gated_delta_rule",
    family=FAMILY,
    mode="chunk",
    signature=("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel",
               "cu_seqlens", KEYWORD_ONLY, "chunk_size", "use_gate_in_kernel", "A_log", "dt_bias",
               "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "state_v_first", "transpose_state_layout",
               "cu_seqlens_cpu", "backend", "stream"),
    options=_FLAGS,
    outputs=_OUTPUTS,
    summary="Gated delta rule computed chunk by chunk (training, prefill), with a backward.",
    doc=("Computes the same function as :func:`~rawdelta.fused_recurrent_gated_delta_rule` (README.md beside the "
         "op's source has the math): per sequence and value head, state ``S`` ``[K, V]`` float32, "
         "``S = exp(g_t) S``, ``d_t = beta_t (v_t - S^T k_t)``, ``S += k_t d_t^T``, ``o_t = S^T (scale q_t)``, "
         "evaluated in chunks of ``chunk_size`` tokens with the WY representation (``(I + L)^-1``) inside each "
         "chunk and one state pass across chunks. It takes no gk, gv or per-value beta (the recurrent op does).\n\n"
         + _CASTS + " No input is modified."),
    backends={"numpy": Backend(f"{_PKG}.naive_chunk"), "numba": Backend(f"{_PKG}.numba_chunk"),
              "cuda": Backend(f"{_PKG}.cuda_chunk")},
    chunk_sizes=(16, 32, 64),
    limits=_LIMITS,
    reference=RECURRENT.name,
    naive=(Reference("naive_chunk_gated_delta_rule",
                     ("q", "k", "v", "g", "beta", "chunk_size", "scale", "initial_state", "output_final_state",
                      KEYWORD_ONLY, "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "A_log", "dt_bias",
                      "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "cu_seqlens"),
                     "Float64 chunked reference of :func:`~rawdelta.chunk_gated_delta_rule` on host arrays (g before "
                     "beta, then ``chunk_size``, as in the peer's reference)."),),
    check_cases=(
        CheckCase("varlen", {"B": 1, "T": 21, "H": 2, "HV": 4, "K": 8, "V": 12, "seqlens": (5, 0, 16), "seed": 9},
                  {"chunk_size": 16}),
    ),
    cases=_CHUNK_CASES,
    bench=BenchSpec(("forward", "forward+backward"), "gdn_chunk", _BENCH_INPUTS,
                    peer="fla.ops.gated_delta_rule:chunk_gated_delta_rule"),
    residuals_doc=("The residuals hold the validated inputs and, from the cuda backend, the forward's per-chunk "
                   "factors (cumulative log2 gates, effective beta, the q/k rows' inverse L2 norms, ``(I + L)^-1`` "
                   "and the masked intra-chunk scores); the backward recomputes the per-chunk states (the peer's "
                   "recompute policy)."),
)
