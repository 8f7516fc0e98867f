"""Framework-free glue shared by the torch and JAX adapters (imports neither framework).

Both adapters reduce a call to: a dict of the present floating inputs (raw NumPy or CuPy arrays), the
``cu_seqlens`` arrays, and a hashable :class:`GDNFlags`; then run the core raw pair on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ops.gated_delta_rule.problem import make_problem
from ..ops.gated_delta_rule.recurrent import (
    FusedRecurrentGatedDeltaRuleResiduals,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)

# Every floating input of the op, in the order the adapters pass and return them.
DIFF_NAMES = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")


@dataclass(frozen=True)
class GDNFlags:
    """The static (non-array) arguments of a gated-delta-rule call; hashable, so JAX can key traces on it."""

    scale: float | None = None
    output_final_state: bool = False
    use_qk_l2norm_in_kernel: bool = False
    use_gate_in_kernel: bool = False
    use_beta_sigmoid_in_kernel: bool = False
    allow_neg_eigval: bool = False

    def kwargs(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "output_final_state": self.output_final_state,
            "use_qk_l2norm_in_kernel": self.use_qk_l2norm_in_kernel,
            "use_gate_in_kernel": self.use_gate_in_kernel,
            "use_beta_sigmoid_in_kernel": self.use_beta_sigmoid_in_kernel,
            "allow_neg_eigval": self.allow_neg_eigval,
        }


def final_state_dtype(v_dtype: Any) -> np.dtype:
    """The contract dtype of the final state: float32, float64 only for float64 inputs (numpy backend)."""
    return np.dtype(np.float64) if np.dtype(v_dtype) == np.float64 else np.dtype(np.float32)


def _call_kwargs(arrays: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any) -> dict[str, Any]:
    kw = {n: arrays.get(n) for n in DIFF_NAMES}
    kw["cu_seqlens"] = cu_seqlens
    kw["cu_seqlens_cpu"] = cu_seqlens_cpu
    return kw


def forward(
    arrays: dict[str, Any],
    cu_seqlens: Any,
    cu_seqlens_cpu: Any,
    flags: GDNFlags,
    backend: str,
    *,
    inplace_final_state: bool = False,
) -> tuple[Any, Any]:
    """Run the core forward on raw arrays; returns ``(o, final_state or None)``.

    Launches go on the current CuPy stream (the adapters make their framework's stream current).
    """
    (o, ht), _ = fused_recurrent_gated_delta_rule_fwd(
        **_call_kwargs(arrays, cu_seqlens, cu_seqlens_cpu), **flags.kwargs(),
        inplace_final_state=inplace_final_state, backend=backend)
    return o, ht


def backward(
    arrays: dict[str, Any],
    cu_seqlens: Any,
    cu_seqlens_cpu: Any,
    flags: GDNFlags,
    backend: str,
    do: Any,
    dht: Any,
) -> dict[str, Any]:
    """Run the core backward on raw arrays; returns ``{name: gradient}`` for every present input.

    The residuals of the recurrent op are the validated inputs only, so they are rebuilt here from the
    saved inputs instead of re-running the forward.
    """
    p = make_problem(**_call_kwargs(arrays, cu_seqlens, cu_seqlens_cpu), **flags.kwargs(), backend=backend)
    grads = fused_recurrent_gated_delta_rule_bwd(FusedRecurrentGatedDeltaRuleResiduals(p), do, dht)
    return {n: getattr(grads, n) for n in DIFF_NAMES if arrays.get(n) is not None}


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
