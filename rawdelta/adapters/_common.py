"""Framework-free glue shared by the torch and JAX adapters (imports neither framework).

Both adapters reduce a call of either gated-delta-rule op to: a dict of the present floating inputs (raw NumPy
or CuPy arrays), the ``cu_seqlens`` arrays, and a hashable :class:`GDNFlags` that also names the mode
(``"recurrent"``: ``fused_recurrent_gated_delta_rule``; ``"chunk"``: ``chunk_gated_delta_rule`` with its
``chunk_size``); then run that mode's core raw pair on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ops.gated_delta_rule import cuda_chunk
from ..ops.gated_delta_rule.calls import backend_stream
from ..ops.gated_delta_rule.chunk import ChunkGatedDeltaRuleResiduals, chunk_gated_delta_rule_bwd, forward_problem
from ..ops.gated_delta_rule.problem import GDNProblem, make_problem
from ..ops.gated_delta_rule.recurrent import (
    FusedRecurrentGatedDeltaRuleResiduals,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)

# Every floating input of the recurrent op, in the order the adapters pass and return them.
DIFF_NAMES = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")
# The chunked mode has no per-key / per-value gates.
RECURRENT_ONLY = ("gk", "gv")
MODES = ("recurrent", "chunk")


def diff_names(mode: str) -> tuple[str, ...]:
    """The floating inputs of `mode`'s op, in :data:`DIFF_NAMES` order."""
    return DIFF_NAMES if mode == "recurrent" else tuple(n for n in DIFF_NAMES if n not in RECURRENT_ONLY)


@dataclass(frozen=True)
class GDNFlags:
    """The static (non-array) arguments of a gated-delta-rule call; hashable, so JAX can key traces on it.

    ``mode`` picks the op (``"recurrent"`` or ``"chunk"``); ``chunk_size`` is the chunked op's (None for the
    recurrent one). Neither is validated here: the core validates ``chunk_size`` with everything else.
    """

    scale: float | None = None
    output_final_state: bool = False
    use_qk_l2norm_in_kernel: bool = False
    use_gate_in_kernel: bool = False
    use_beta_sigmoid_in_kernel: bool = False
    allow_neg_eigval: bool = False
    mode: str = "recurrent"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments both modes' core functions take."""
        return {
            "scale": self.scale,
            "output_final_state": self.output_final_state,
            "use_qk_l2norm_in_kernel": self.use_qk_l2norm_in_kernel,
            "use_gate_in_kernel": self.use_gate_in_kernel,
            "use_beta_sigmoid_in_kernel": self.use_beta_sigmoid_in_kernel,
            "allow_neg_eigval": self.allow_neg_eigval,
        }

    @property
    def diff_names(self) -> tuple[str, ...]:
        return diff_names(self.mode)


def final_state_dtype(v_dtype: Any) -> np.dtype:
    """The contract dtype of the final state: float32, float64 only for float64 inputs (numpy backend)."""
    return np.dtype(np.float64) if np.dtype(v_dtype) == np.float64 else np.dtype(np.float32)


def _call_kwargs(arrays: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any, flags: GDNFlags) -> dict[str, Any]:
    names = flags.diff_names
    extra = [n for n, a in arrays.items() if a is not None and n not in names]
    if extra:
        raise ValueError(f"{', '.join(extra)}: not an input of the {flags.mode} mode")
    kw = {n: arrays.get(n) for n in names}
    kw["cu_seqlens"] = cu_seqlens
    kw["cu_seqlens_cpu"] = cu_seqlens_cpu
    kw.update(flags.kwargs())
    return kw


def workspace_nbytes(flags: GDNFlags, q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: Any,
                     compute_capability: str | None) -> int:
    """Bytes of the workspace in which the chunked mode's forward keeps its per-chunk factors for the backward
    (``cuda_chunk.factor_nbytes``); 0 for the recurrent mode, whose residuals are its inputs, and off the GPU
    (``compute_capability`` None; else like ``"90"``)."""
    if flags.mode != "chunk":
        return 0
    return cuda_chunk.factor_nbytes(q_shape, v_shape, dtype, flags.chunk_size, flags.use_qk_l2norm_in_kernel,
                                    compute_capability)


def _chunk_problem(kw: dict[str, Any], flags: GDNFlags, backend: str) -> GDNProblem:
    # The validation of chunk_gated_delta_rule_fwd.
    return make_problem(**kw, backend=backend, allow_gk_gv=False, allow_beta_per_v=False,
                        chunk_size=flags.chunk_size)


def forward(
    arrays: dict[str, Any],
    cu_seqlens: Any,
    cu_seqlens_cpu: Any,
    flags: GDNFlags,
    backend: str,
    *,
    inplace_final_state: bool = False,
    workspace: Any = None,
) -> tuple[Any, Any]:
    """Run the core forward of ``flags.mode`` on raw arrays; returns ``(o, final_state or None)``.

    Launches go on the current CuPy stream (the adapters make their framework's stream current).
    ``inplace_final_state`` is the recurrent mode's only. ``workspace`` (chunked mode, cuda backend): a 1-D
    uint8 array of :func:`workspace_nbytes` bytes that receives the per-chunk factors, to be handed to
    :func:`backward`.
    """
    kw = _call_kwargs(arrays, cu_seqlens, cu_seqlens_cpu, flags)
    if flags.mode == "chunk":
        if inplace_final_state:
            raise ValueError("inplace_final_state is only supported by the recurrent mode")
        p = _chunk_problem(kw, flags, backend)
        (o, ht), _ = forward_problem(p, flags.chunk_size, workspace if p.backend == "cuda" else None)
    else:
        (o, ht), _ = fused_recurrent_gated_delta_rule_fwd(**kw, inplace_final_state=inplace_final_state,
                                                          backend=backend)
    return o, ht


def backward(
    arrays: dict[str, Any],
    cu_seqlens: Any,
    cu_seqlens_cpu: Any,
    flags: GDNFlags,
    backend: str,
    do: Any,
    dht: Any,
    workspace: Any = None,
) -> dict[str, Any]:
    """Run the core backward of ``flags.mode`` on raw arrays; returns ``{name: gradient}`` for every present input.

    The residuals of both modes are the validated inputs (and the chunk size), so they are rebuilt here from
    the saved inputs instead of re-running the forward; the validation matches the mode's ``_fwd``. The
    chunked mode takes its per-chunk factors from the forward's ``workspace`` where that holds them, and
    recomputes them otherwise.
    """
    kw = _call_kwargs(arrays, cu_seqlens, cu_seqlens_cpu, flags)
    if flags.mode == "chunk":
        p = _chunk_problem(kw, flags, backend)
        factors = None
        if p.backend == "cuda" and workspace is not None:
            with backend_stream(p):
                factors = cuda_chunk.factors_from_workspace(p, flags.chunk_size, workspace)
        grads = chunk_gated_delta_rule_bwd(ChunkGatedDeltaRuleResiduals(p, flags.chunk_size, factors), do, dht)
    else:
        p = make_problem(**kw, backend=backend)
        grads = fused_recurrent_gated_delta_rule_bwd(FusedRecurrentGatedDeltaRuleResiduals(p), do, dht)
    return {n: getattr(grads, n) for n in flags.diff_names if arrays.get(n) is not None}


def cupy_external_stream(ptr: int, device_id: int) -> Any:
    """A CuPy stream object for a raw ``cudaStream_t`` owned by torch or XLA.

    CuPy 14 deprecates ``ExternalStream`` in favour of ``Stream.from_external``, which needs a
    ``__cuda_stream__`` object and cannot be told the device; ``ExternalStream`` can, so keep it and
    silence the warning. Not cached: entering one CuPy stream object from two threads at once would
    mix up the streams they restore on exit.
    """
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(int(ptr), int(device_id))
