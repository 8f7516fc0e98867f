"""Host side of the CUDA recurrent gated delta rule: picks instantiations, allocates, launches.

Kernels: ``rawdelta/cuda/gated_delta_rule/recurrent.cu``, and the gradients' finishing shared with the chunked
mode (:mod:`.cuda_common`). The forward owns (4 columns, rows) slices of the state (16-byte state accesses, 16 row
parts of KPT rows in granules of 4, 32 columns per block); the backward owns one column per warp (KPT rows per
lane), checkpoints the state every C steps and recomputes each segment from its checkpoint with the per-step states
in shared memory.

Every kernel takes the update rule and the direction of time as its template parameter RULE (gdn_common.cuh): the
gated delta rule's correction, or the plain update ``S += k vᵀ`` forward or time-reversed, with which GLA's
recurrent op (``rawdelta/ops/gla/cuda_recurrent.py``) runs these kernels; a problem picks it by its
``update_rule`` (:func:`update_rule`).

Both read and write the states in the caller's layout (:data:`NATIVE_STATE_V_FIRST`): ``[N, HV, K, V]``, or
``[N, HV, V, K]`` with ``state_v_first`` (the F_V_FIRST flag). The forward has a kernel per layout, each moving the
state in whole 128-byte lines: in the second a warp owns a few value columns and all K rows (4 rows per lane).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._arrays import empty
from ...cuda import launch
from ...cuda.launch import CTYPES, ptr
from ...cuda.loader import get_kernel, register
from .cuda_common import F_DHT, F_HT, finish_gradients, problem_flags

# The backend protocol's capability (rawdelta/ops/common/opdef.py, Backend): initial_state, the final state, dht and
# dh0 are taken and returned in the caller's layout, so state_v_first costs no transposed copy.
NATIVE_STATE_V_FIRST = True

if TYPE_CHECKING:
    from .definition import GDNProblem

SOURCE = "gated_delta_rule/recurrent.cu"
# Forward geometry (column groups per warp CG, warps W): 4 * CG columns per block, (32 / CG) * W row parts.
# Measured on the H100 decode benchmark: CG=8, W=4 with registers bounded for 6 blocks per SM beat
# whole-row warps (CG=32, W=8: 194 registers, one block per SM) and the unbounded allocation.
FWD_GEOM = (8, 4)
FWD_MIN_BLOCKS = 6
FWD_KPT = (1, 2, 4, 8, 16)  # rows per thread; K <= 16 * KPT
# The [N, HV, V, K] forward: W warps per block, RL rows per lane (K <= 32 * RL) and 32 // RL value columns per warp.
FWD_VK_W = 4
FWD_VK_RL = (4, 8)
BWD_WARPS = 8
BWD_KPT_C = ((1, 32), (2, 32), (4, 16), (8, 8))  # (rows per lane, segment length C); K <= 32 * KPT
_SMEM_STATIC_LIMIT = 48 * 1024
# The kernels' RULE (gdn_common.cuh): the update rule and the direction of time.
RULE_DELTA, RULE_PLAIN, RULE_PLAIN_REVERSED = 0, 1, 2
# The rules of GLA's recurrent op; the time-reversed one has no decode form (ONE_STEP).
PLAIN_RULES = (RULE_PLAIN, RULE_PLAIN_REVERSED)


def update_rule(p: GDNProblem) -> int:
    """The kernels' RULE for a problem: its ``update_rule`` where it sets one (GLA's), else the delta rule's."""
    return int(getattr(p, "update_rule", RULE_DELTA))


def fwd_name(ct: str, kpt: int, one_step: bool = False, geom: tuple[int, int] = FWD_GEOM,
             min_blocks: int = FWD_MIN_BLOCKS, rule: int = RULE_DELTA) -> str:
    """The forward kernel's instantiation: input C type, rows per thread, geometry (CG, W), the decode-step form,
    the blocks per SM its registers must allow and the rule."""
    return (f"gdn_recurrent_fwd_kernel<{ct}, {kpt}, {geom[0]}, {geom[1]}, {launch.cpp_bool(one_step)}, "
            f"{min_blocks}, {rule}>")


def fwd_vk_name(ct: str, rl: int, one_step: bool = False, w: int = FWD_VK_W, min_blocks: int = FWD_MIN_BLOCKS,
                rule: int = RULE_DELTA) -> str:
    """The [N, HV, V, K] forward kernel's instantiation: input C type, rows per lane, the decode-step form, warps
    per block, the blocks per SM its registers must allow and the rule."""
    return (f"gdn_recurrent_fwd_vk_kernel<{ct}, {rl}, {32 // rl}, {w}, {launch.cpp_bool(one_step)}, "
            f"{min_blocks}, {rule}>")


def fwd_vk_rows(K: int) -> int:
    """Rows per lane of the [N, HV, V, K] forward kernel for K keys."""
    return next(rl for rl in FWD_VK_RL if 32 * rl >= K)


def _fwd_row_parts(geom: tuple[int, int] = FWD_GEOM) -> int:
    return (32 // geom[0]) * geom[1]


def _bwd_name(ct: str, kpt: int, rule: int = RULE_DELTA) -> str:
    return f"gdn_recurrent_bwd_kernel<{ct}, {kpt}, {rule}>"


def _forms(rule: int) -> tuple[bool, ...]:
    """The forward's forms (ONE_STEP) a rule is instantiated with: the decode step only forward in time."""
    return (False,) if rule == RULE_PLAIN_REVERSED else (False, True)


register(
    SOURCE,
    [fwd_name(ct, kpt, one, rule=r) for r in (RULE_DELTA, *PLAIN_RULES) for ct in CTYPES.values() for kpt in FWD_KPT
     for one in _forms(r)]
    + [fwd_vk_name(ct, rl, one, rule=r) for r in (RULE_DELTA, *PLAIN_RULES) for ct in CTYPES.values()
       for rl in FWD_VK_RL for one in _forms(r)]
    + [_bwd_name(ct, kpt, r) for r in (RULE_DELTA, *PLAIN_RULES) for ct in CTYPES.values() for kpt, _ in BWD_KPT_C],
)


def fwd_kpt(K: int, geom: tuple[int, int] = FWD_GEOM) -> int:
    """Rows per thread of the forward kernel of geometry `geom` for K keys."""
    return next(kpt for kpt in FWD_KPT if _fwd_row_parts(geom) * kpt >= K)


def _bwd_kpt_c(K: int) -> tuple[int, int]:
    return next((kpt, c) for kpt, c in BWD_KPT_C if 32 * kpt >= K)


def state_shape(p: GDNProblem) -> tuple[int, int, int, int]:
    """The states' shape in the caller's layout: ``[N, HV, K, V]``, or ``[N, HV, V, K]`` with ``state_v_first``."""
    return (p.N, p.HV, p.V, p.K) if p.state_layout_native else (p.N, p.HV, p.K, p.V)


def recurrent_forward(p: GDNProblem) -> tuple[Any, Any]:
    """Launch the forward: o ``[B, T, HV, V]`` (v's dtype) and the final state (float32, :func:`state_shape`).

    With ``p.inplace_final_state`` the final state is written into ``p.initial_state``.
    """
    import cupy

    o = empty(cupy, (p.B, p.T, p.HV, p.V), p.v.dtype)
    flags = problem_flags(p)
    ht = None
    if p.output_final_state:
        ht = p.initial_state if p.inplace_final_state else empty(cupy, state_shape(p), np.float32)
        flags |= F_HT
    rule = update_rule(p)
    one_step = p.T <= 1 and p.cu_seqlens is None and rule != RULE_PLAIN_REVERSED
    if p.state_layout_native:
        rl = fwd_vk_rows(p.K)
        nvb = math.ceil(p.V / (FWD_VK_W * (32 // rl)))
        name, warps = fwd_vk_name(CTYPES[p.q.dtype], rl, one_step, rule=rule), FWD_VK_W
    else:
        nvb = math.ceil(p.V / (4 * FWD_GEOM[0]))
        name, warps = fwd_name(CTYPES[p.q.dtype], fwd_kpt(p.K), one_step, rule=rule), FWD_GEOM[1]
    grid = p.N * p.HV * nvb
    if grid > 0:
        get_kernel(SOURCE, name)((grid,), (32 * warps,), (
            p.q, p.k, p.v, ptr(p.g), ptr(p.gk), ptr(p.gv), ptr(p.beta), ptr(p.initial_state), ptr(p.A_log),
            ptr(p.dt_bias), ptr(p.cu_seqlens), o, ptr(ht), np.int32(p.T), np.int32(p.H), np.int32(p.HV),
            np.int32(p.K), np.int32(p.V), np.int32(nvb), np.float32(p.scale), np.int32(flags)))
    return o, ht


def recurrent_backward(p: GDNProblem, do: Any, dht: Any) -> dict[str, Any]:
    """Launch the backward; returns float32 gradients (dq, dk, dv in the input dtype) keyed by input name.

    ``do`` ``[B, T, HV, V]``; ``dht`` and the returned dh0 in the states' layout (:func:`state_shape`)."""
    import cupy

    do = do if do.dtype == np.float32 else do.astype(np.float32)
    if dht is not None and dht.dtype != np.float32:
        dht = dht.astype(np.float32)
    flags = problem_flags(p) | (F_DHT if dht is not None else 0)
    BT = p.B * p.T
    kpt, C = _bwd_kpt_c(p.K)
    ns = max(1, math.ceil(int(p.seq_lengths.max(initial=0)) / C))
    max_vb = math.ceil(p.V / BWD_WARPS)
    nvb = max(1, min(max_vb, 8, math.ceil(2 * launch.sm_count() / max(1, p.N * p.HV))))
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
    ct = CTYPES[p.q.dtype]
    args_common = (np.int32(p.T), np.int32(p.H), np.int32(p.HV), np.int32(p.K), np.int32(p.V), np.int32(nvb),
                   np.float32(p.scale), np.int32(flags))
    if grid > 0:
        kern = get_kernel(SOURCE, _bwd_name(ct, kpt, update_rule(p)))
        smem = C * BWD_WARPS * (32 * kpt + 2) * 4
        static = (3 * BWD_WARPS * 32 * kpt + 2 * BWD_WARPS) * 4
        if smem + static > _SMEM_STATIC_LIMIT:
            kern.max_dynamic_shared_size_bytes = smem
        kern((grid,), (BWD_WARPS * 32,), (
            p.q, p.k, p.v, ptr(p.g), ptr(p.gk), ptr(p.gv), ptr(p.beta), ptr(p.initial_state), ptr(p.A_log),
            ptr(p.dt_bias), ptr(p.cu_seqlens), do, ptr(dht), ckpt, np.int32(ns), np.int32(C), part_dq, part_dk,
            ptr(part_dgk), part_dg, part_db, dv, ptr(dgv), ptr(dbeta_v), ptr(dh0), np.int64(BT), *args_common),
            shared_mem=smem)
    grads = finish_gradients(p, flags, part_dq, part_dk, part_dg, part_db, part_dgk, nvb, dbeta_v=dbeta_v)
    grads.update({"v": dv, "initial_state": dh0, "gv": dgv})
    return grads


def forward(p: GDNProblem, workspace: Any = None) -> tuple[tuple[Any, Any], None]:
    """The cuda backend's forward (the backend protocol: ``rawdelta/ops/common/opdef.py``, ``Backend``):
    ``((o, ht), None)``; the backward recomputes from the inputs."""
    return recurrent_forward(p), None


def backward(p: GDNProblem, saved: Any, do: Any, dht: Any) -> dict[str, Any]:
    """The cuda backend's backward (the backend protocol): :func:`recurrent_backward`."""
    return recurrent_backward(p, do, dht)
