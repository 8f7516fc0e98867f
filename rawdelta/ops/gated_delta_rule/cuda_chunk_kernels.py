"""The CUDA chunked gated delta rule's kernels: the sources of its stages, the names of their instantiations, and
their registration with the loader (every instantiation the host can launch).

Template arguments: ``ct`` the input C type (``launch.CTYPES``), the mma type of the mma.sync kernels
(``launch.MMA_TYPE``), ``bt`` the chunk size, ``kp`` the key dimension padded to one of :data:`KP_SIZES`, the value
columns of a block (:func:`bv`); the Hopper kernels (16-bit inputs, chunks of :data:`WG_BT`) take warpgroups per
block, value columns per warpgroup and their code-path switches.
"""

from __future__ import annotations

from ...cuda.launch import CTYPES, MMA_TYPE, cpp_bool
from ...cuda.loader import HOPPER_TARGETS, register
from .definition import CHUNK

PREPARE_SOURCE = "gated_delta_rule/chunk_prepare.cu"  # prepare
FWD_SOURCE = "gated_delta_rule/chunk_fwd.cu"  # the forward state passes
BWD_SOURCE = "gated_delta_rule/chunk_bwd.cu"  # the reverse state passes
DQK_SOURCE = "gated_delta_rule/chunk_bwd_dqk.cu"  # dq, dk and the gate rows

GATE_ROWS_KERNEL = "gdn_chunk_bwd_gate_rows_kernel"
KP_SIZES = (64, 128, 256)  # key dimension padded to one of these
KS = 64  # key slice of the dq/dk kernel
BVB = 64  # value columns per step of the dq/dk kernel's loop over V
PREP_THREADS = 256  # threads per block of the prepare kernel (its NTHREADS template argument)

# Hopper kernels (wgmma): 16-bit inputs, chunks of 64.
WG_TYPES = ("__half", "__nv_bfloat16")
WG_BT = 64


def kp_for(K: int) -> int:
    """The padded key dimension of K keys."""
    return next(kp for kp in KP_SIZES if kp >= K)


def bv(ct: str, kp: int) -> int:
    """Value columns per block of the mma.sync state passes (float32 at K=256 halves it to fit shared memory)."""
    return 16 if (ct == "float" and kp == 256) else 32


def wg_bvw_options(kp: int) -> tuple[int, ...]:
    """Value columns per warpgroup the Hopper state passes are built for at padded key dimension `kp`."""
    return (16,) if kp == 256 else (16, 32)


def dqk_wg_ksw(K: int) -> int:
    """Keys per warpgroup of the Hopper dq/dk kernel: a slice of 2 KSW keys per item covers K <= 128 at once."""
    return 32 if K <= 64 else 64


def prepare_name(ct: str, bt: int, kp: int, ahead: bool = False) -> str:
    return f"gdn_chunk_prepare_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {PREP_THREADS}, {cpp_bool(ahead)}>"


def fwd_name(ct: str, bt: int, kp: int, store: bool) -> str:
    return f"gdn_chunk_fwd_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {bv(ct, kp)}, {cpp_bool(store)}>"


def fwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, store: bool, pipe: bool, ahead: bool = False) -> str:
    return (f"gdn_chunk_fwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {cpp_bool(store)}, {cpp_bool(pipe)}, "
            f"{cpp_bool(ahead)}>")


def bwd_state_name(ct: str, bt: int, kp: int) -> str:
    return f"gdn_chunk_bwd_state_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {kp}, {bv(ct, kp)}>"


def bwd_wg_name(ct: str, kp: int, nwg: int, bvw: int, pipe: bool) -> str:
    return f"gdn_chunk_bwd_wg_kernel<{ct}, {kp}, {nwg}, {bvw}, {cpp_bool(pipe)}>"


def dqk_name(ct: str, bt: int) -> str:
    return f"gdn_chunk_bwd_dqk_kernel<{ct}, {MMA_TYPE[ct]}, {bt}, {KS}, {BVB}>"


def dqk_wg_name(ct: str, ksw: int, fuse: bool) -> str:
    return f"gdn_chunk_bwd_dqk_wg_kernel<{ct}, {ksw}, {cpp_bool(fuse)}>"


_CTS = tuple(CTYPES.values())

# The mma.sync kernels, on every device.
register(PREPARE_SOURCE, [prepare_name(ct, bt, kp) for ct in _CTS for bt in CHUNK.chunk_sizes for kp in KP_SIZES])
register(FWD_SOURCE, [fwd_name(ct, bt, kp, s) for ct in _CTS for bt in CHUNK.chunk_sizes for kp in KP_SIZES
                      for s in (False, True)])
register(BWD_SOURCE, [bwd_state_name(ct, bt, kp) for ct in _CTS for bt in CHUNK.chunk_sizes for kp in KP_SIZES])
register(DQK_SOURCE, [GATE_ROWS_KERNEL] + [dqk_name(ct, bt) for ct in _CTS for bt in CHUNK.chunk_sizes])

# The Hopper kernels, on compute capability 9.0 only: the forward pass (prefetching or not, as the output pass or
# the backward's recompute; beside prepare with one or two warpgroups), prepare beside it, the reverse pass, dq/dk.
register(PREPARE_SOURCE, [prepare_name(ct, WG_BT, kp, True) for ct in WG_TYPES for kp in KP_SIZES],
         targets=HOPPER_TARGETS)
register(
    FWD_SOURCE,
    [fwd_wg_name(ct, kp, 2, bvw, s, pp) for ct in WG_TYPES for kp in KP_SIZES for bvw in wg_bvw_options(kp)
     for s in (False, True) for pp in (False, True)]
    + [fwd_wg_name(ct, kp, 2, bvw, False, True, True) for ct in WG_TYPES for kp in KP_SIZES
       for bvw in wg_bvw_options(kp)]
    + [fwd_wg_name(ct, kp, 1, 32, False, True, True) for ct in WG_TYPES for kp in KP_SIZES
       if 32 in wg_bvw_options(kp)]
    + [fwd_wg_name(ct, kp, 4, bvw, s, True) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)
       for s in (False, True)],
    targets=HOPPER_TARGETS,
)
register(BWD_SOURCE, [bwd_wg_name(ct, kp, 2, bvw, pp) for ct in WG_TYPES for kp in KP_SIZES
                      for bvw in wg_bvw_options(kp) for pp in (False, True)]
         + [bwd_wg_name(ct, kp, 4, bvw, True) for ct in WG_TYPES for kp in (64, 128) for bvw in (16, 32)],
         targets=HOPPER_TARGETS)
register(DQK_SOURCE, [dqk_wg_name(ct, ksw, f) for ct in WG_TYPES for ksw in (32, 64) for f in (False, True)],
         targets=HOPPER_TARGETS)
