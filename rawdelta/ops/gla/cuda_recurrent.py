"""The cuda backend of :func:`~rawdelta.fused_recurrent_gla`: the gated delta rule's recurrent kernels
(``rawdelta/cuda/gated_delta_rule/recurrent.cu``) with the plain update rule ``S += k vᵀ``, forward in time or
reversed (``reverse=True``), the per-key and per-value gates as theirs (``gk``, ``gv``).

The same kernels, so the same properties: the decode step, the in-place final state, states natively in either
layout (:data:`NATIVE_STATE_V_FIRST`), resets by selection, a backward that recomputes the states from checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..gated_delta_rule import cuda_recurrent as kernels

if TYPE_CHECKING:
    from .definition import GLAProblem

# The backend protocol's capability (rawdelta/ops/common/opdef.py, Backend): the kernels take and return states in
# the caller's layout.
NATIVE_STATE_V_FIRST = True

# What the gated delta rule's kernels read that GLA does not have: no scalar gate, no beta, no in-kernel activations.
_ABSENT = {"g": None, "beta": None, "A_log": None, "dt_bias": None, "beta_per_v": False,
           "use_qk_l2norm_in_kernel": False, "use_gate_in_kernel": False, "use_beta_sigmoid_in_kernel": False,
           "allow_neg_eigval": False}
_GRADS = ("q", "k", "v", "gk", "gv", "initial_state")


def _kernel_problem(p: GLAProblem) -> Any:
    """The call as the recurrent kernels take it: one value head per key head and the plain rule."""
    rule = kernels.RULE_PLAIN_REVERSED if p.reverse else kernels.RULE_PLAIN
    return p.replace(**_ABSENT, HV=p.H, update_rule=rule)


def forward(p: GLAProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The backend protocol's forward: ``((o, ht), None)``; the backward recomputes from the inputs."""
    return kernels.recurrent_forward(_kernel_problem(p)), None


def backward(p: GLAProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The backend protocol's backward: the gradients of q, k, v, gk, gv and the initial state."""
    grads = kernels.recurrent_backward(_kernel_problem(p), do, dht)
    return {n: grads.get(n) for n in _GRADS}
