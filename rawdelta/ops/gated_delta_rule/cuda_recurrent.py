"""Host side of the CUDA recurrent gated delta rule: picks instantiations, allocates, launches.

Kernels: ``rawdelta/cuda/gated_delta_rule/recurrent.cu``. The forward owns (4 columns, rows) slices
of the state (16-byte state accesses, 16 row parts of KPT rows, 32 columns per block); the backward
owns one column per warp (KPT rows per lane), checkpoints the state every C steps and recomputes each
segment from its checkpoint with the per-step states in shared memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, empty
from ...cuda.loader import get_kernel, register
from .problem import GDNProblem

SOURCE = "gated_delta_rule/recurrent.cu"
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
# Forward geometry (column groups per warp CG, warps W): 4 * CG columns per block, (32 / CG) * W row parts.
# Measured on the H100 decode benchmark: CG=8, W=4 with registers bounded for 6 blocks per SM beat
# whole-row warps (CG=32, W=8: 194 registers, one block per SM) and the unbounded allocation.
FWD_GEOM = (8, 4)
FWD_MIN_BLOCKS = 6
FWD_KPT = (1, 2, 4, 8, 16)  # rows per thread; K <= 16 * KPT
BWD_WARPS = 8
BWD_KPT_C = ((1, 32), (2, 32), (4, 16), (8, 8))  # (rows per lane, segment length C); K <= 32 * KPT
_SMEM_STATIC_LIMIT = 48 * 1024
_NULL = np.uint64(0)

# Flag bits, mirrored from recurrent.cu.
F_G, F_GK, F_GV, F_BETA, F_BETA_V, F_L2, F_GATE, F_DTB = 1, 2, 4, 8, 16, 32, 64, 128
F_BSIG, F_NEG, F_H0, F_HT, F_VARLEN, F_DHT = 256, 512, 1024, 2048, 4096, 8192


def _fwd_name(ct: str, kpt: int, one_step: bool = False, geom: tuple[int, int] = FWD_GEOM,
              min_blocks: int = FWD_MIN_BLOCKS) -> str:
    return (f"gdn_recurrent_fwd_kernel<{ct}, {kpt}, {geom[0]}, {geom[1]}, {'true' if one_step else 'false'}, "
            f"{min_blocks}>")


def _fwd_row_parts(geom: tuple[int, int] = FWD_GEOM) -> int:
    return (32 // geom[0]) * geom[1]


def _bwd_name(ct: str, kpt: int) -> str:
    return f"gdn_recurrent_bwd_kernel<{ct}, {kpt}>"


def _finish_qk_name(ct: str) -> str:
    return f"gdn_recurrent_bwd_finish_qk_kernel<{ct}>"


register(
    SOURCE,
    [_fwd_name(ct, kpt, one) for ct in CTYPES.values() for kpt in FWD_KPT for one in (False, True)]
    + [_bwd_name(ct, kpt) for ct in CTYPES.values() for kpt, _ in BWD_KPT_C]
    + [_finish_qk_name(ct) for ct in CTYPES.values()]
    + ["gdn_recurrent_bwd_finish_gates_kernel", "gdn_recurrent_bwd_gate_params_kernel"],
)


def _fwd_kpt(K: int, geom: tuple[int, int] = FWD_GEOM) -> int:
    return next(kpt for kpt in FWD_KPT if _fwd_row_parts(geom) * kpt >= K)


def _bwd_kpt_c(K: int) -> tuple[int, int]:
    return next((kpt, c) for kpt, c in BWD_KPT_C if 32 * kpt >= K)


@functools.cache
def _num_sms(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])


def _flags(p: GDNProblem) -> int:
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
    f |= F_H0 if p.initial_state is not None else 0
    f |= F_VARLEN if p.cu_seqlens is not None else 0
    return f


def _ptr(x: Any) -> Any:
    return _NULL if x is None else x


def _ctype(p: GDNProblem) -> str:
    return CTYPES[p.q.dtype]


def recurrent_forward(p: GDNProblem) -> tuple[Any, Any]:
    """Launch the forward: o ``[B, T, HV, V]`` (v's dtype) and the final state ``[N, HV, K, V]`` float32.

    With ``p.inplace_final_state`` the final state is written into ``p.initial_state``.
    """
    import cupy

    o = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    flags = _flags(p)
    ht = None
    if p.output_final_state:
        ht = p.initial_state if p.inplace_final_state else empty(cupy, (p.N, p.HV, p.K, p.V), np.float32)
        flags |= F_HT
    nvb = math.ceil(p.V / (4 * FWD_GEOM[0]))
    grid = p.N * p.HV * nvb
    if grid > 0:
        one_step = p.T <= 1 and p.cu_seqlens is None
        kern = get_kernel(SOURCE, _fwd_name(_ctype(p), _fwd_kpt(p.K), one_step))
        kern((grid,), (32 * FWD_GEOM[1],), (
            p.q, p.k, p.v, _ptr(p.g), _ptr(p.gk), _ptr(p.gv), _ptr(p.beta), _ptr(p.initial_state), _ptr(p.A_log),
            _ptr(p.dt_bias), _ptr(p.cu_seqlens), o, _ptr(ht), np.int32(p.T), np.int32(p.H), np.int32(p.HV),
            np.int32(p.K), np.int32(p.V), np.int32(nvb), np.float32(p.scale), np.int32(flags)))
    return o, ht


def recurrent_backward(p: GDNProblem, do: Any, dht: Any) -> dict[str, Any]:
    """Launch the backward; returns float32 gradients (dq, dk, dv in the input dtype) keyed by input name."""
    import cupy

    do = do if do.dtype == np.float32 else do.astype(np.float32)
    if dht is not None and dht.dtype != np.float32:
        dht = dht.astype(np.float32)
    flags = _flags(p) | (F_DHT if dht is not None else 0)
    BT = p.B * p.T
    kpt, C = _bwd_kpt_c(p.K)
    ns = max(1, math.ceil(int(p.seq_lengths.max(initial=0)) / C))
    max_vb = math.ceil(p.V / BWD_WARPS)
    nvb = max(1, min(max_vb, 8, math.ceil(2 * _num_sms(cupy.cuda.Device().id) / max(1, p.N * p.HV))))
    grid = p.N * p.HV * nvb

    dv = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    part_dq = empty(cupy, (nvb, BT, p.HV, p.K), np.float32)
    part_dk = empty(cupy, (nvb, BT, p.HV, p.K), np.float32)
    part_dgk = empty(cupy, (nvb, BT, p.HV, p.K), np.float32) if p.gk is not None else None
    part_dg = empty(cupy, (nvb, BT, p.HV), np.float32)
    part_db = empty(cupy, (nvb, BT, p.HV), np.float32)
    ckpt = empty(cupy, (grid, ns, BWD_WARPS, 32 * kpt), np.float32)
    dgv = empty(cupy, p.gv.shape, np.float32) if p.gv is not None else None
    dbeta_v = empty(cupy, p.beta.shape, np.float32) if p.beta_per_v else None
    dh0 = empty(cupy, p.initial_state.shape, np.float32) if p.initial_state is not None else None
    ct = _ctype(p)
    args_common = (np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V), np.int32(nvb),
                   np.float32(p.scale), np.int32(flags))
    if grid > 0:
        kern = get_kernel(SOURCE, _bwd_name(ct, kpt))
        smem = C * BWD_WARPS * (32 * kpt + 2) * 4
        static = (3 * BWD_WARPS * 32 * kpt + 2 * BWD_WARPS) * 4
        if smem + static > _SMEM_STATIC_LIMIT:
            kern.max_dynamic_shared_size_bytes = smem
        kern((grid,), (BWD_WARPS * 32,), (
            p.q, p.k, p.v, _ptr(p.g), _ptr(p.gk), _ptr(p.gv), _ptr(p.beta), _ptr(p.initial_state), _ptr(p.A_log),
            _ptr(p.dt_bias), _ptr(p.cu_seqlens), do, _ptr(dht), ckpt, np.int32(ns), np.int32(C), part_dq, part_dk,
            _ptr(part_dgk), part_dg, part_db, dv, _ptr(dgv), _ptr(dbeta_v), _ptr(dh0), np.int64(BT), *args_common),
            shared_mem=smem)
    grads = finish_gradients(p, flags, part_dq, part_dk, part_dg, part_db, part_dgk, nvb, dbeta_v=dbeta_v)
    grads.update({"v": dv, "initial_state": dh0, "gv": dgv})
    return grads


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
    ct = _ctype(p)
    if qk is not None:
        dq, dk = qk
    else:
        dq = empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype)
        dk = empty(cupy, (p.B, p.T, p.H, p.K), p.q.dtype)
    if BT > 0 and qk is None:
        get_kernel(SOURCE, _finish_qk_name(ct))((math.ceil(BT * p.H / 4),), (128,), (
            p.q, p.k, part_dq, part_dk, dq, dk, np.int64(BT), np.int32(p.H), np.int32(p.HV), np.int32(p.K),
            np.int32(nvb), np.int32(flags)))
    grads: dict[str, Any] = {"q": dq, "k": dk}
    dg = empty(cupy, (p.B, p.T, p.HV), np.float32) if p.g is not None else None
    dbeta = dbeta_v if p.beta_per_v else (empty(cupy, (p.B, p.T, p.HV), np.float32) if p.beta is not None else None)
    dgk = empty(cupy, (p.B, p.T, p.HV, p.K), np.float32) if p.gk is not None else None
    gate_terms = empty(cupy, (2, BT, p.HV), np.float32) if p.use_gate_in_kernel else None
    if BT > 0 and (dg is not None or dgk is not None or (dbeta is not None and not p.beta_per_v)):
        n = BT * p.HV
        get_kernel(SOURCE, "gdn_recurrent_bwd_finish_gates_kernel")((math.ceil(n / 256),), (256,), (
            _ptr(p.g), _ptr(p.beta), _ptr(p.A_log), _ptr(p.dt_bias), part_dg, part_db, _ptr(part_dgk), _ptr(dg),
            _ptr(None if p.beta_per_v else dbeta), _ptr(dgk), _ptr(gate_terms), np.int64(BT), np.int32(p.HV),
            np.int32(p.K), np.int32(nvb), np.int32(flags)))
    grads.update({"g": dg, "beta": dbeta, "gk": dgk})
    if p.use_gate_in_kernel:
        dA_log = empty(cupy, (p.HV,), np.float32)
        ddt = empty(cupy, (p.HV,), np.float32) if p.dt_bias is not None else None
        if BT > 0:
            get_kernel(SOURCE, "gdn_recurrent_bwd_gate_params_kernel")((p.HV,), (256,), (
                gate_terms, dA_log, _ptr(ddt), np.int64(BT), np.int32(p.HV), np.int32(flags)))
        else:
            dA_log.fill(0)
            if ddt is not None:
                ddt.fill(0)
        grads.update({"A_log": dA_log, "dt_bias": ddt})
    return grads
