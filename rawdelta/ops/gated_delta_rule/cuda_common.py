"""The CUDA host side that both modes of the gated delta rule share: the option flags their kernels take
(``rawdelta/cuda/gated_delta_rule/gdn_common.cuh``) and the finishing of the gradients
(``rawdelta/cuda/gated_delta_rule/bwd_finish.cu``: sums of the per-block partials, the L2 norm's, gates' and beta's
backward).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.loader import get_kernel, register
from ..common.state_pass_host import PASS_DHT, PASS_H0, PASS_HT, PASS_ROW_NORMS, PASS_VARLEN, input_pass_flags

if TYPE_CHECKING:
    from .definition import GDNProblem

FINISH_SOURCE = "gated_delta_rule/bwd_finish.cu"

# Flag bits, mirrored from gdn_common.cuh. F_L2, F_H0, F_HT, F_VARLEN and F_DHT are the common state passes' bits
# (ops/common/state_pass_host.py). F_V_FIRST: the states are [N, HV, V, K].
F_G, F_GK, F_GV, F_BETA, F_BETA_V, F_GATE, F_DTB, F_BSIG, F_NEG, F_V_FIRST = 1, 2, 4, 8, 16, 64, 128, 256, 512, 16384
F_L2, F_H0, F_HT, F_VARLEN, F_DHT = PASS_ROW_NORMS, PASS_H0, PASS_HT, PASS_VARLEN, PASS_DHT


def problem_flags(p: GDNProblem) -> int:
    """The flag bits of a problem's inputs and options (without F_HT and F_DHT, which depend on the launch)."""
    f = 0
    f |= F_G if p.g is not None else 0
    f |= F_GK if p.gk is not None else 0
    f |= F_GV if p.gv is not None else 0
    f |= F_BETA if p.beta is not None else 0
    f |= F_BETA_V if p.beta_per_v else 0
    f |= F_L2 if p.use_qk_l2norm_in_kernel else 0
    f |= F_GATE if p.use_gate_in_kernel else 0
    f |= F_DTB if p.dt_bias is not None else 0
    f |= F_BSIG if p.use_beta_sigmoid_in_kernel else 0
    f |= F_NEG if p.allow_neg_eigval else 0
    f |= input_pass_flags(p.initial_state, p.cu_seqlens)
    f |= F_V_FIRST if p.state_layout_native else 0
    return f


def _finish_qk_name(ct: str) -> str:
    return f"gdn_bwd_finish_qk_kernel<{ct}>"


register(FINISH_SOURCE, [_finish_qk_name(ct) for ct in launch.CTYPES.values()]
         + ["gdn_bwd_finish_gates_kernel", "gdn_bwd_gate_params_kernel"])


def finish_gradients(p: GDNProblem, flags: int, part_dq: Any, part_dk: Any, part_dg: Any, part_db: Any,
                     part_dgk: Any, nvb: int, *, dbeta_v: Any = None, qk: tuple[Any, Any] | None = None
                     ) -> dict[str, Any]:
    """Sum per-block partial gradients and apply the input transforms' backward (shared by both modes).

    part_dq, part_dk ``[nvb, B*T, HV, K]`` float32 (per value head: summed over each group here, then
    through the L2 norm); part_dg, part_db ``[nvb, B*T, HV]`` (gradients of the log-gate and of the
    effective beta: through the in-kernel gate and the beta sigmoid here); part_dgk like part_dq or
    None. ``qk``: dq and dk already finished by the caller (part_dq and part_dk are then unused). Returns q,
    k (input dtype), g, beta, gk, A_log, dt_bias (float32; None where absent).
    """
    import cupy

    BT = p.B * p.T
    ct = launch.CTYPES[p.q.dtype]
    ptr = launch.ptr
    if qk is not None:
        dq, dk = qk
    else:
        dq = empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype)
        dk = empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype)
    if BT > 0 and qk is None:
        get_kernel(FINISH_SOURCE, _finish_qk_name(ct))((math.ceil(BT * p.H / 4),), (128,), (
            p.q, p.k, part_dq, part_dk, dq, dk, np.int64(BT), np.int32(p.H), np.int32(p.HV), np.int32(p.K),
            np.int32(nvb), np.int32(flags)))
    grads: dict[str, Any] = {"q": dq, "k": dk}
    dg = empty(cupy, (p.B, p.T, p.HV), np.float32) if p.g is not None else None
    dbeta = dbeta_v if p.beta_per_v else (empty(cupy, (p.B, p.T, p.HV), np.float32) if p.beta is not None else None)
    dgk = empty(cupy, (p.B, p.T, p.HV, p.K), np.float32) if p.gk is not None else None
    gate_terms = empty(cupy, (2, BT, p.HV), np.float32) if p.use_gate_in_kernel else None
    if BT > 0 and (dg is not None or dgk is not None or (dbeta is not None and not p.beta_per_v)):
        n = BT * p.HV
        get_kernel(FINISH_SOURCE, "gdn_bwd_finish_gates_kernel")((math.ceil(n / 256),), (256,), (
            ptr(p.g), ptr(p.beta), ptr(p.A_log), ptr(p.dt_bias), part_dg, part_db, ptr(part_dgk), ptr(dg),
            ptr(None if p.beta_per_v else dbeta), ptr(dgk), ptr(gate_terms), np.int64(BT), np.int32(p.HV),
            np.int32(p.K), np.int32(nvb), np.int32(flags)))
    grads.update({"g": dg, "beta": dbeta, "gk": dgk})
    if p.use_gate_in_kernel:
        dA_log = empty(cupy, (p.HV,), np.float32)
        ddt = empty(cupy, (p.HV,), np.float32) if p.dt_bias is not None else None
        if BT > 0:
            get_kernel(FINISH_SOURCE, "gdn_bwd_gate_params_kernel")((p.HV,), (256,), (
                gate_terms, dA_log, ptr(ddt), np.int64(BT), np.int32(p.HV), np.int32(flags)))
        else:
            dA_log.fill(0)
            if ddt is not None:
                ddt.fill(0)
        grads.update({"A_log": dA_log, "dt_bias": ddt})
    return grads
