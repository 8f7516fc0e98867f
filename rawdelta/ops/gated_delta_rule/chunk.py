"""`chunk_gated_delta_rule`: the chunked gated delta rule (training and prefill), forward and backward.

Public entry points (api.md sections 2-3)::

    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, ...)
    (o, final_state), residuals = chunk_gated_delta_rule_fwd(q, k, v, g, beta, ...)
    grads = chunk_gated_delta_rule_bwd(residuals, do, dht=None)

Backends: ``numpy`` (naive_chunk.py, float64), ``numba`` (numba_chunk.py, float32) and ``cuda``
(cuda_chunk.py launching the tensor-core kernels of ``rawdelta/cuda/gated_delta_rule/chunk.cu``).
Each backend module exposes ``chunk_forward(p, chunk_size) -> (o, ht)`` and
``chunk_backward(p, chunk_size, do, dht) -> dict`` of gradients keyed like :class:`GatedDeltaRuleGrads`;
the cuda backend's forward also returns its per-chunk factors, which its backward takes back (``factors``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .calls import GatedDeltaRuleGrads, backend_stream, cast_grads, cast_outputs, check_cotangents
from .problem import CHUNK_SIZES, GDNProblem, make_problem

__all__ = ["CHUNK_SIZES", "ChunkGatedDeltaRuleResiduals", "chunk_gated_delta_rule", "chunk_gated_delta_rule_bwd",
           "chunk_gated_delta_rule_fwd"]


class ChunkGatedDeltaRuleResiduals(NamedTuple):
    """What the backward needs: the validated inputs, the chunk size and, from the cuda backend, the forward's
    per-chunk factors (the per-chunk states are recomputed, the peer's recompute policy).

    Attributes:
        problem: the validated call (inputs as contiguous arrays, shapes, options, backend, stream).
        chunk_size: the forward's chunk size.
        factors: the cuda forward's per-chunk factors (cumulative log2 gates, effective beta, the q/k rows'
            inverse L2 norms ``[B*T, HV]`` float32; ``(I + L)^-1`` and the masked intra-chunk scores
            ``[B*T, HV, chunk_size]`` 16-bit), which its backward reuses instead of recomputing them.
            None for the numpy and numba backends: the backward then recomputes them. (The torch and JAX
            adapters rebuild the residuals from the inputs and take the factors from the workspace their
            forward filled: ``cuda_chunk.factors_from_workspace``.)
    """

    problem: GDNProblem
    chunk_size: int
    factors: Any = None


def _impl(backend: str) -> Any:
    if backend == "numpy":
        from . import naive_chunk

        return naive_chunk
    if backend == "numba":
        from . import numba_chunk

        return numba_chunk
    from . import cuda_chunk

    return cuda_chunk


def chunk_gated_delta_rule_fwd(
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
    chunk_size: int = 64,
    use_gate_in_kernel: bool = False,
    A_log: Any = None,
    dt_bias: Any = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    cu_seqlens_cpu: Any = None,
    backend: str = "auto",
    stream: Any = None,
) -> tuple[tuple[Any, Any], ChunkGatedDeltaRuleResiduals]:
    """Forward pass returning ``((o, final_state), residuals)`` for :func:`chunk_gated_delta_rule_bwd`.

    Same arguments as :func:`chunk_gated_delta_rule`. ``residuals`` holds the validated inputs, the chunk
    size and (cuda) the per-chunk factors; the backward recomputes the per-chunk states.
    """
    p = make_problem(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
                     use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                     use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
                     cu_seqlens_cpu=cu_seqlens_cpu, backend=backend, stream=stream, allow_gk_gv=False,
                     allow_beta_per_v=False, chunk_size=chunk_size)
    return forward_problem(p, chunk_size)


def forward_problem(p: GDNProblem, chunk_size: int, workspace: Any = None) -> tuple[tuple[Any, Any],
                                                                                  ChunkGatedDeltaRuleResiduals]:
    """:func:`chunk_gated_delta_rule_fwd` on a validated problem. The framework adapters pass `workspace`, a
    1-D uint8 array of ``cuda_chunk.factor_nbytes`` bytes that they keep for the backward: the cuda backend
    writes its per-chunk factors there (where it is their size) instead of into fresh arrays."""
    factors = None
    with backend_stream(p):
        if p.backend == "cuda":
            o, ht, factors = _impl(p.backend).chunk_forward(p, chunk_size, workspace)
        else:
            o, ht = _impl(p.backend).chunk_forward(p, chunk_size)
        o, ht = cast_outputs(p, o, ht)
    return (o, ht if p.output_final_state else None), ChunkGatedDeltaRuleResiduals(p, chunk_size, factors)


def chunk_gated_delta_rule_bwd(
    residuals: ChunkGatedDeltaRuleResiduals, do: Any, dht: Any = None
) -> GatedDeltaRuleGrads:
    """Backward pass: gradients of every floating input from ``do`` ``[B, T, HV, V]`` and ``dht`` ``[N, HV, K, V]``.

    Returns :class:`GatedDeltaRuleGrads` (q, k, v, g, beta, initial_state, A_log, dt_bias; gk and gv are
    always None in this mode), each in its input's dtype (dh0 in float32), None for inputs that were None.
    """
    p, chunk_size, factors = residuals
    do, dht = check_cotangents(p, do, dht)
    with backend_stream(p):
        if p.backend == "cuda":
            grads = _impl(p.backend).chunk_backward(p, chunk_size, do, dht, factors)
        else:
            grads = _impl(p.backend).chunk_backward(p, chunk_size, do, dht)
    return cast_grads(p, grads)


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
    use_gate_in_kernel: bool = False,
    A_log: Any = None,
    dt_bias: Any = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    cu_seqlens_cpu: Any = None,
    backend: str = "auto",
    stream: Any = None,
) -> tuple[Any, Any]:
    """Gated delta rule computed chunk by chunk (training, prefill), with a backward.

    Computes the same function as :func:`~rawdelta.fused_recurrent_gated_delta_rule` (README.md beside this
    file has the math): per sequence and value head, state ``S`` ``[K, V]`` float32,
    ``S = exp(g_t) S``, ``d_t = beta_t (v_t - S^T k_t)``, ``S += k_t d_t^T``, ``o_t = S^T (scale q_t)``,
    evaluated in chunks of ``chunk_size`` tokens with the WY representation (``(I + L)^-1``) inside each
    chunk and one state pass across chunks.

    Args:
        q (array): queries ``[B, T, H, K]``, float32/float16/bfloat16.
        k (array): keys ``[B, T, H, K]``, same dtype as q.
        v (array): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0`` (value head hv uses key head
            ``hv // (HV // H)``).
        g (array, optional): scalar log-decay ``[B, T, HV]`` (natural log, <= 0), or the raw gate when
            ``use_gate_in_kernel``. Default: ``None`` (no decay).
        beta (array, optional): ``[B, T, HV]`` (per value dimension is recurrent-only). Default: ``None`` (ones).
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (array, optional): ``[N, HV, K, V]``, any float dtype (read as float32). Default: ``None``.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` float32. Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head (eps 1e-6 inside the sqrt). Default: ``False``.
        cu_seqlens (array, optional): int32/int64 ``[N + 1]`` offsets for packed sequences (B must be 1);
            chunks never cross a sequence; empty sequences are allowed. Default: ``None``.
        chunk_size (int): tokens per chunk, 16, 32 or 64. Default: 64.
        use_gate_in_kernel (bool): ``g_t = -exp(A_log) * softplus(g_raw + dt_bias)``. Default: ``False``.
        A_log (array, optional): ``[HV]``, needed with ``use_gate_in_kernel``.
        dt_bias (array, optional): ``[HV]``, optional with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits; ``beta = sigmoid(beta)``. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        cu_seqlens_cpu (array, optional): host copy of ``cu_seqlens``, to avoid a device-to-host copy.
        backend (str): ``"auto"`` (cuda for device arrays, numpy for host), ``"cuda"``, ``"numba"``, ``"numpy"``.
        stream: CUDA stream for the launches (CuPy stream or raw handle). Default: CuPy's current stream.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32 or None.

    Non-contiguous inputs are copied; g, beta, A_log, dt_bias and initial_state are read as float32
    (copied when given in another dtype). No input is modified.
    """
    (o, ht), _ = chunk_gated_delta_rule_fwd(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
        chunk_size=chunk_size, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        cu_seqlens_cpu=cu_seqlens_cpu, backend=backend, stream=stream)
    return o, ht
