"""`fused_recurrent_gated_delta_rule`: the token-by-token gated delta rule, forward and backward.

Public entry points (api.md sections 2-3)::

    o, final_state = fused_recurrent_gated_delta_rule(q, k, v, g, beta, ...)
    (o, final_state), residuals = fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, ...)
    grads = fused_recurrent_gated_delta_rule_bwd(residuals, do, dht=None)

Backends: ``numpy`` (naive.py, float64), ``numba`` (numba_ref.py, float32) and ``cuda``
(cuda_recurrent.py launching ``rawdelta/cuda/gated_delta_rule/recurrent.cu``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .calls import GatedDeltaRuleGrads, backend_stream, cast_grads, cast_outputs, check_cotangents
from .problem import GDNProblem, make_problem


class FusedRecurrentGatedDeltaRuleResiduals(NamedTuple):
    """What the backward needs: the validated inputs only (states are recomputed from checkpoints).

    Attributes:
        problem: the validated call (inputs as contiguous arrays, shapes, options, backend, stream).
    """

    problem: GDNProblem


def _impl(backend: str) -> Any:
    if backend == "numpy":
        from . import naive

        return naive
    if backend == "numba":
        from . import numba_ref

        return numba_ref
    from . import cuda_recurrent

    return cuda_recurrent


def fused_recurrent_gated_delta_rule_fwd(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    beta: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    *,
    gk: Any = None,
    gv: Any = None,
    use_gate_in_kernel: bool = False,
    A_log: Any = None,
    dt_bias: Any = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens_cpu: Any = None,
    backend: str = "auto",
    stream: Any = None,
) -> tuple[tuple[Any, Any], FusedRecurrentGatedDeltaRuleResiduals]:
    """Forward pass returning ``((o, final_state), residuals)`` for :func:`fused_recurrent_gated_delta_rule_bwd`.

    Same arguments as :func:`fused_recurrent_gated_delta_rule`. ``residuals`` holds the validated
    inputs only; the backward recomputes states from checkpoints every C steps.
    """
    p = make_problem(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
                     gk=gk, gv=gv, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                     use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
                     inplace_final_state=inplace_final_state, cu_seqlens_cpu=cu_seqlens_cpu, backend=backend,
                     stream=stream)
    with backend_stream(p):
        o, ht = cast_outputs(p, *_impl(p.backend).recurrent_forward(p))
    if p.backend == "numpy" and p.inplace_final_state:
        p.initial_state[...] = ht
        ht = p.initial_state
    return (o, ht if p.output_final_state else None), FusedRecurrentGatedDeltaRuleResiduals(p)


def fused_recurrent_gated_delta_rule_bwd(
    residuals: FusedRecurrentGatedDeltaRuleResiduals, do: Any, dht: Any = None
) -> GatedDeltaRuleGrads:
    """Backward pass: gradients of every floating input from ``do`` ``[B, T, HV, V]`` and ``dht`` ``[N, HV, K, V]``.

    Returns :class:`GatedDeltaRuleGrads` (q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias), each in
    its input's dtype (dh0 in float32), None for inputs that were None.
    """
    p = residuals.problem
    if p.inplace_final_state:
        raise ValueError("residuals come from a call with inplace_final_state=True, which overwrote initial_state; "
                         "run the forward without it to take gradients")
    do, dht = check_cotangents(p, do, dht)
    with backend_stream(p):
        grads = _impl(p.backend).recurrent_backward(p, do, dht)
    return cast_grads(p, grads)


def fused_recurrent_gated_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    beta: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    *,
    gk: Any = None,
    gv: Any = None,
    use_gate_in_kernel: bool = False,
    A_log: Any = None,
    dt_bias: Any = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens_cpu: Any = None,
    backend: str = "auto",
    stream: Any = None,
) -> tuple[Any, Any]:
    """Gated delta rule, one token at a time (decoding, short sequences), with a backward.

    Per sequence and value head, with state ``S`` ``[K, V]`` (float32)::

        S~  = S * exp(g_t) * exp(gk_t)[:, None] * exp(gv_t)[None, :]
        d_t = beta_t * (v_t - S~^T k_t)
        S   = S~ + k_t d_t^T
        o_t = S^T (scale * q_t)

    Args:
        q (array): queries ``[B, T, H, K]``, float32/float16/bfloat16.
        k (array): keys ``[B, T, H, K]``, same dtype as q.
        v (array): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0`` (value head hv uses key head
            ``hv // (HV // H)``).
        g (array, optional): scalar log-decay ``[B, T, HV]`` (natural log, <= 0), or the raw gate when
            ``use_gate_in_kernel``. Default: ``None`` (no decay).
        beta (array, optional): ``[B, T, HV]`` or per value dimension ``[B, T, HV, V]``. Default: ``None`` (ones).
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (array, optional): ``[N, HV, K, V]``, any float dtype (read as float32). Default: ``None``.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` float32. Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head (eps 1e-6 inside the sqrt). Default: ``False``.
        cu_seqlens (array, optional): int32/int64 ``[N + 1]`` offsets for packed sequences (B must be 1);
            empty sequences are allowed. A device array is copied to the host once for validation; pass
            ``cu_seqlens_cpu`` to avoid that synchronisation. Default: ``None``.
        gk (array, optional): per-key log-decay ``[B, T, HV, K]``. Default: ``None``.
        gv (array, optional): per-value log-decay ``[B, T, HV, V]``. Default: ``None``.
        use_gate_in_kernel (bool): ``g_t = -exp(A_log) * softplus(g_raw + dt_bias)``. Default: ``False``.
        A_log (array, optional): ``[HV]``, needed with ``use_gate_in_kernel``.
        dt_bias (array, optional): ``[HV]``, optional with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits; ``beta = sigmoid(beta)``. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        inplace_final_state (bool): write the final state into ``initial_state`` (float32, contiguous) and
            return it; for decoding. The call then has no backward. Default: ``False``.
        cu_seqlens_cpu (array, optional): host copy of ``cu_seqlens``, to avoid a device-to-host copy.
        backend (str): ``"auto"`` (cuda for device arrays, numpy for host), ``"cuda"``, ``"numba"``, ``"numpy"``.
        stream: CUDA stream for the launches (CuPy stream or raw handle). Default: CuPy's current stream.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32 or None.

    Non-contiguous inputs are copied; gates, beta, A_log, dt_bias and initial_state are read as float32
    (copied when given in another dtype). No input is modified unless ``inplace_final_state=True``.
    """
    (o, ht), _ = fused_recurrent_gated_delta_rule_fwd(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
        gk=gk, gv=gv, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        inplace_final_state=inplace_final_state, cu_seqlens_cpu=cu_seqlens_cpu, backend=backend, stream=stream)
    return o, ht

