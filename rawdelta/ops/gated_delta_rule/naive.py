"""Float64 NumPy reference of the recurrent gated delta rule, forward and backward: the ``numpy`` backend.

Everything is computed in float64 whatever the input dtypes, token by token, vectorised over value
heads and the ``K x V`` state. The backward is written by hand (reverse mode, no autograd library)
and keeps every per-step state: this is the reference, memory is not a concern. The math, with every
option, is in README.md beside this file.

Entry points: :func:`recurrent_forward` / :func:`recurrent_backward` on a validated problem, and the backend
protocol's :func:`forward` / :func:`backward` (``rawdelta/ops/common/opdef.py``, ``Backend``) over them; the public
``naive_recurrent_gated_delta_rule`` pair is generated from the op's declaration (definition.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ..common.chunk_stages import mul0

if TYPE_CHECKING:
    from .definition import GDNProblem

L2NORM_EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0
_GRAD_NAMES = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")


def as_f64(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # logaddexp form: no overflow warning for large |x|.
    return np.exp(-np.logaddexp(0.0, -x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))


def _vecmat(x: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``S[h]^T x[h]`` per head: x ``[HV, K]``, S ``[HV, K, V]`` -> ``[HV, V]``."""
    return (x[:, None, :] @ S)[:, 0, :]


def _matvec(S: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``S[h] y[h]`` per head: S ``[HV, K, V]``, y ``[HV, V]`` -> ``[HV, K]``."""
    return (S @ y[:, :, None])[:, :, 0]


@dataclass
class Inputs:
    """The problem's inputs in float64 after every in-kernel transform, q and k expanded to value heads."""

    q_n: np.ndarray  # [B, T, H, K] after the optional L2 norm
    k_n: np.ndarray
    r_q: np.ndarray | None  # [B, T, H, 1] reciprocal norms, when use_qk_l2norm_in_kernel
    r_k: np.ndarray | None
    q: np.ndarray  # [B, T, HV, K]
    k: np.ndarray
    v: np.ndarray  # [B, T, HV, V]
    beta: np.ndarray  # [B, T, HV, 1] (scalar per head, ones when absent) or [B, T, HV, V]
    sig_beta: np.ndarray | None  # sigma(beta_raw) when use_beta_sigmoid_in_kernel
    g: np.ndarray | None  # [B, T, HV] log decay (after the in-kernel gate)
    gate_arg: np.ndarray | None  # [B, T, HV] g_raw + dt_bias, when use_gate_in_kernel
    exp_g: np.ndarray | None  # [B, T, HV, 1, 1]
    exp_gk: np.ndarray | None  # [B, T, HV, K, 1]
    exp_gv: np.ndarray | None  # [B, T, HV, 1, V]
    h0: np.ndarray | None  # [N, HV, K, V]


def _l2norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = 1.0 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    return x * r, r


def prepare_inputs(p: GDNProblem) -> Inputs:
    q, k, v = as_f64(p.q), as_f64(p.k), as_f64(p.v)
    r_q = r_k = None
    if p.use_qk_l2norm_in_kernel:
        q, r_q = _l2norm(q)
        k, r_k = _l2norm(k)
    group = p.HV // p.H
    # Value head hv reads key head hv // group: consecutive value heads share a key head.
    q_hv = np.repeat(q, group, axis=2)
    k_hv = np.repeat(k, group, axis=2)

    sig_beta = None
    if p.beta is None:
        beta = np.ones((p.B, p.T, p.HV, 1))
    else:
        beta = as_f64(p.beta)
        if p.use_beta_sigmoid_in_kernel:
            sig_beta = _sigmoid(beta)
            beta = (2.0 if p.allow_neg_eigval else 1.0) * sig_beta
        if beta.ndim == 3:
            beta = beta[..., None]

    g = as_f64(p.g)
    gate_arg = None
    if p.use_gate_in_kernel:
        dt_bias = np.zeros(p.HV) if p.dt_bias is None else as_f64(p.dt_bias)
        gate_arg = g + dt_bias
        g = -np.exp(as_f64(p.A_log)) * _softplus(gate_arg)
    gk, gv = as_f64(p.gk), as_f64(p.gv)
    return Inputs(
        q_n=q, k_n=k, r_q=r_q, r_k=r_k, q=q_hv, k=k_hv, v=v, beta=beta, sig_beta=sig_beta, g=g, gate_arg=gate_arg,
        exp_g=None if g is None else np.exp(g)[..., None, None],
        exp_gk=None if gk is None else np.exp(gk)[..., None],
        exp_gv=None if gv is None else np.exp(gv)[..., None, :],
        h0=as_f64(p.initial_state),
    )


def _decay(x: Inputs, b: int, t: int) -> np.ndarray | float:
    """``D_t`` broadcastable to ``[HV, K, V]`` (1.0 when there is no gate)."""
    d: np.ndarray | float = 1.0
    for e in (x.exp_g, x.exp_gk, x.exp_gv):
        if e is not None:
            d = d * e[b, t]
    return d


def _run_sequence(
    p: GDNProblem, x: Inputs, b: int, s: int, e: int, S: np.ndarray, o: np.ndarray | None
) -> list[np.ndarray]:
    """Run tokens ``[s, e)`` of batch row b from state S, writing o if given; returns the states ``S_s .. S_e``."""
    states = [S]
    for t in range(s, e):
        St = mul0(_decay(x, b, t), S)  # a reset (decay 0) discards the state, as the chunked form's selection does
        u = x.v[b, t] - _vecmat(x.k[b, t], St)
        delta = x.beta[b, t] * u
        S = St + x.k[b, t][:, :, None] * delta[:, None, :]
        if o is not None:
            o[b, t] = p.scale * _vecmat(x.q[b, t], S)
        states.append(S)
    return states


def sequence_initial_state(p: GDNProblem, x: Inputs, n: int) -> np.ndarray:
    """Sequence n's initial state ``[HV, K, V]`` (zeros without one)."""
    return x.h0[n] if x.h0 is not None else np.zeros((p.HV, p.K, p.V))


def finish_grads(
    p: GDNProblem,
    x: Inputs,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
    dbeta: np.ndarray,
    dg: np.ndarray | None,
    dgk: np.ndarray | None,
    dgv: np.ndarray | None,
    dh0: np.ndarray,
) -> dict[str, np.ndarray | None]:
    """Gradients w.r.t. the raw inputs from those w.r.t. the transformed ones (both modes share this).

    Sums dq, dk ``[B, T, HV, K]`` over each group of value heads sharing a key head, then applies the
    L2-norm backward; the beta-sigmoid backward to dbeta ``[B, T, HV, 1|V]``; the in-kernel gate backward
    to dg ``[B, T, HV]`` (giving dA_log, ddt_bias). Returns the dict keyed ``_GRAD_NAMES`` (None for absent
    inputs).
    """
    group = p.HV // p.H
    dq = dq.reshape(p.B, p.T, p.H, group, p.K).sum(3)
    dk = dk.reshape(p.B, p.T, p.H, group, p.K).sum(3)
    if p.use_qk_l2norm_in_kernel:
        dq = x.r_q * (dq - np.sum(dq * x.q_n, axis=-1, keepdims=True) * x.q_n)
        dk = x.r_k * (dk - np.sum(dk * x.k_n, axis=-1, keepdims=True) * x.k_n)

    grads: dict[str, np.ndarray | None] = dict.fromkeys(_GRAD_NAMES)
    grads.update(q=dq, k=dk, v=dv)
    if p.beta is not None:
        db = dbeta if p.beta.ndim == 4 else dbeta[..., 0]
        if p.use_beta_sigmoid_in_kernel:
            db = db * (2.0 if p.allow_neg_eigval else 1.0) * x.sig_beta * (1.0 - x.sig_beta)
        grads["beta"] = db
    grads.update(gk=dgk, gv=dgv)
    if dg is not None:
        if p.use_gate_in_kernel:
            grads["A_log"] = np.sum(mul0(dg, x.g), axis=(0, 1))
            # sigma(x) as the softplus derivative also above the threshold, like the peer and the kernels
            # (it differs from the exact derivative 1 there by < 3e-9).
            dg = mul0(dg, -np.exp(as_f64(p.A_log)) * _sigmoid(x.gate_arg))
            if p.dt_bias is not None:
                grads["dt_bias"] = dg.sum(axis=(0, 1))
        grads["g"] = dg
    if p.initial_state is not None:
        grads["initial_state"] = dh0
    return grads


def recurrent_forward(p: GDNProblem) -> tuple[np.ndarray, np.ndarray]:
    """Float64 forward of the recurrent gated delta rule.

    Args:
        p: the validated call (any input dtypes; every input is cast to float64).

    Returns:
        ``(o, ht)``: o ``[B, T, HV, V]`` and the final state ``[N, HV, K, V]`` (always computed), float64.
        An empty sequence's final state is its initial state (or zeros).
    """
    x = prepare_inputs(p)
    o = empty(np, (p.B, p.T, p.HV, p.V), np.float64)
    ht = empty(np, (p.N, p.HV, p.K, p.V), np.float64)
    for n, (b, s, e) in enumerate(p.seq_bounds):
        ht[n] = _run_sequence(p, x, b, s, e, sequence_initial_state(p, x, n), o)[-1]
    return o, ht


def recurrent_backward(p: GDNProblem, do: Any, dht: Any = None) -> dict[str, np.ndarray | None]:
    """Float64 reverse-mode backward of the recurrent gated delta rule (states recomputed and all kept).

    Args:
        p: the validated call of the forward.
        do: cotangent of o ``[B, T, HV, V]``.
        dht: cotangent of the final state ``[N, HV, K, V]``, or None (zeros).

    Returns:
        Float64 gradients keyed ``q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias``; None for absent
        inputs. They are taken w.r.t. the raw inputs: through the L2 norm, the beta sigmoid and the
        in-kernel gate when those options are on (``g`` is then the raw gate). ``dq``, ``dk`` are summed
        over each group of value heads sharing a key head.
    """
    x = prepare_inputs(p)
    do = as_f64(do)
    dht = as_f64(dht)
    B, T, HV, K, V = p.B, p.T, p.HV, p.K, p.V
    dq = empty(np, (B, T, HV, K), np.float64)
    dk = empty(np, (B, T, HV, K), np.float64)
    dv = empty(np, (B, T, HV, V), np.float64)
    dbeta = empty(np, (B, T, HV, x.beta.shape[-1]), np.float64)
    # Gradients of log D_t = g_t + gk_t[:, None] + gv_t[None, :], reduced over the dims each gate lacks.
    dg = None if x.g is None else empty(np, (B, T, HV), np.float64)
    dgk = None if p.gk is None else empty(np, (B, T, HV, K), np.float64)
    dgv = None if p.gv is None else empty(np, (B, T, HV, V), np.float64)
    dh0 = empty(np, (p.N, HV, K, V), np.float64)

    for n, (b, s, e) in enumerate(p.seq_bounds):
        states = _run_sequence(p, x, b, s, e, sequence_initial_state(p, x, n), None)
        dS = dht[n] if dht is not None else np.zeros((HV, K, V))
        for i in range(e - s - 1, -1, -1):
            t = s + i
            q_t, k_t, beta_t, do_t = x.q[b, t], x.k[b, t], x.beta[b, t], do[b, t]
            D = _decay(x, b, t)
            St = mul0(D, states[i])
            u = x.v[b, t] - _vecmat(k_t, St)
            delta = beta_t * u

            dS = dS + p.scale * q_t[:, :, None] * do_t[:, None, :]
            dq[b, t] = p.scale * _matvec(states[i + 1], do_t)
            ddelta = _vecmat(k_t, dS)
            # A zero cotangent meets beta or the decay here at a token past a NaN or an infinity (or at a reset):
            # mul0 keeps it zero, so nothing from that token reaches the earlier ones.
            du = mul0(beta_t, ddelta)
            dv[b, t] = du
            dbeta_t = ddelta * u
            dbeta[b, t] = dbeta_t if dbeta.shape[-1] == V else dbeta_t.sum(-1, keepdims=True)
            dSt = dS - k_t[:, :, None] * du[:, None, :]
            dk[b, t] = _matvec(dS, delta) - _matvec(St, du)
            Z = mul0(dSt, St)
            if dg is not None:
                dg[b, t] = Z.sum(axis=(1, 2))
            if dgk is not None:
                dgk[b, t] = Z.sum(axis=2)
            if dgv is not None:
                dgv[b, t] = Z.sum(axis=1)
            dS = mul0(D, dSt)
        dh0[n] = dS

    return finish_grads(p, x, dq, dk, dv, dbeta, dg, dgk, dgv, dh0)


def forward(p: GDNProblem, workspace: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], None]:
    """The numpy backend's forward (the backend protocol): ``((o, ht), None)``, float64."""
    return recurrent_forward(p), None


def backward(p: GDNProblem, saved: Any, do: Any, dht: Any) -> dict[str, np.ndarray | None]:
    """The numpy backend's backward (the backend protocol): :func:`recurrent_backward`."""
    return recurrent_backward(p, do, dht)
