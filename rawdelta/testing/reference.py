"""The float64 reference every backend of every op is compared with: the numpy backend of the op's reference op.

An op's reference op (:attr:`~rawdelta.ops.common.opdef.OpDef.reference`) is the op whose numpy backend defines
its function: itself, or for a chunked form the recurrence it evaluates (the chunked GDN's is
``fused_recurrent_gated_delta_rule``). That backend computes in float64 whatever the input dtypes, so it sees
exactly the (rounded) inputs the backend under test saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..ops import registry
from ..ops.common.api import reference_backward, reference_forward
from ..ops.common.opdef import OpDef


def reference_results(op: OpDef | str, kw: dict[str, Any], do: Any = None, dht: Any = None,
                      mode_op: bool = False) -> tuple[dict[str, np.ndarray | None], dict[str, np.ndarray | None]]:
    """Float64 ``(outputs by name, gradients by input name)`` of `op` on host arrays `kw` (its keyword arguments;
    those its reference op does not take, like ``chunk_size``, are dropped), the final state always computed.

    With ``mode_op`` the op's own numpy backend runs (the chunked algorithm of a chunked op) instead of its
    reference op's. Gradients are computed when ``do`` is given (``dht`` None: no final-state cotangent); None for
    absent inputs.
    """
    op = registry.op(op) if isinstance(op, str) else op
    ref = op if mode_op or op.reference is None else registry.op(op.reference)
    name = {} if ref is op else dict(op.reference_args)  # this op's argument names -> the reference op's
    args = {name.get(n, n): x for n, x in kw.items()
            if name.get(n, n) in ref.takes and n not in ("backend", "stream", "inplace_final_state")}
    if ref.has_state:
        args["output_final_state"] = True
    outs = reference_forward(ref, args)
    outputs = {spec.name: np.asarray(x, dtype=np.float64) for spec, x in zip(ref.outputs, outs)}
    grads: dict[str, np.ndarray | None] = {}
    if do is not None:
        got = reference_backward(ref, args, np.asarray(do), None if dht is None else np.asarray(dht))
        grads = {n: (None if getattr(got, name.get(n, n)) is None
                     else np.asarray(getattr(got, name.get(n, n)), dtype=np.float64))
                 for n in op.differentiable if name.get(n, n) in ref.differentiable and kw.get(n) is not None}
    return outputs, grads


def grad_label(name: str) -> str:
    """How tables and assertions name the gradient of input `name` (``dq``; ``dh0`` for the initial state)."""
    return "dh0" if name == "initial_state" else "d" + name
