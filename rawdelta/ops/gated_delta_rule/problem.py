"""Validation and normalisation of a gated-delta-rule call, shared by every mode and backend.

`make_problem` validates once at the public boundary (every reason at once, naming the argument and
the expected ``[B, T, H, K]`` shape with bound values), converts inputs to contiguous arrays of one
array library, casts the small gate/beta/state inputs to float32 (documented), resolves the backend,
and returns a frozen :class:`GDNProblem` that every backend consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, as_array, contiguous, device_id, is_device_array
from ..._validate import FLOAT_DTYPE_NAMES, Validator
from ..common.backend import resolve_backend

MAX_K_CUDA = 256
CHUNK_SIZES = (16, 32, 64)
_CUDA_DTYPES = frozenset(np.dtype(n) for n in ("float32", "float16")) | {BFLOAT16}
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

_ARRAY_ARGS = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")
# Inputs the kernels read as float32 whatever their dtype (small, or accuracy-critical).
_FLOAT32_ARGS = ("g", "gk", "gv", "beta", "initial_state", "A_log", "dt_bias")


@dataclass(frozen=True)
class GDNProblem:
    """A validated gated-delta-rule call. Arrays are C-contiguous and share one array library.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, HV, V]``; g ``[B, T, HV]``; gk ``[B, T, HV, K]``;
    gv ``[B, T, HV, V]``; beta ``[B, T, HV]`` or ``[B, T, HV, V]``; initial_state ``[N, HV, K, V]``
    (float32); A_log, dt_bias ``[HV]``; cu_seqlens int64 ``[N + 1]`` (same library as q) with its
    host copy ``cu_seqlens_host``. q, k, v keep their dtype; the others are float32.
    """

    q: Any
    k: Any
    v: Any
    g: Any
    gk: Any
    gv: Any
    beta: Any
    initial_state: Any
    A_log: Any
    dt_bias: Any
    cu_seqlens: Any
    cu_seqlens_host: np.ndarray | None
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    scale: float
    use_qk_l2norm_in_kernel: bool
    use_gate_in_kernel: bool
    use_beta_sigmoid_in_kernel: bool
    allow_neg_eigval: bool
    output_final_state: bool
    inplace_final_state: bool
    backend: str
    stream: Any
    input_dtypes: dict[str, Any]  # the caller's dtype per array argument, for casting gradients back

    @property
    def xp(self) -> Any:
        if isinstance(self.q, np.ndarray):
            return np
        import cupy

        return cupy

    @property
    def beta_per_v(self) -> bool:
        return self.beta is not None and self.beta.ndim == 4

    @property
    def seq_lengths(self) -> np.ndarray:
        """Tokens per sequence ``[N]`` (int64), from the host copy of ``cu_seqlens``."""
        if self.cu_seqlens_host is None:
            return np.full(self.N, self.T, dtype=np.int64)
        return np.diff(self.cu_seqlens_host.astype(np.int64, copy=False))

    @property
    def seq_bounds(self) -> list[tuple[int, int, int]]:
        """``(batch row, start, end)`` per sequence n, in T coordinates of that row."""
        if self.cu_seqlens_host is None:
            return [(b, 0, self.T) for b in range(self.B)]
        c = self.cu_seqlens_host
        return [(0, int(c[n]), int(c[n + 1])) for n in range(self.N)]

    def arrays(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in _ARRAY_ARGS}


RECURRENT: Any = object()  # make_problem's chunk_size for the recurrent mode (None is a chunked caller's error)


def make_problem(
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
    allow_gk_gv: bool = True,
    allow_beta_per_v: bool = True,
    chunk_size: Any = RECURRENT,
) -> GDNProblem:
    """Validate a gated-delta-rule call and normalise it into a :class:`GDNProblem`.

    ``allow_gk_gv`` / ``allow_beta_per_v`` are False for the chunked mode, which also passes its
    ``chunk_size`` (one of ``CHUNK_SIZES``; the default, ``RECURRENT``, means the recurrent mode) to be
    validated with everything else.
    """
    v_ = Validator()
    if chunk_size is not RECURRENT and (
        chunk_size is None or isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES
    ):
        v_.error(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    raw = {"q": q, "k": k, "v": v, "g": g, "gk": gk, "gv": gv, "beta": beta, "initial_state": initial_state,
           "A_log": A_log, "dt_bias": dt_bias}
    arrs: dict[str, Any] = {}
    for name, x in raw.items():
        if x is None:
            if name in ("q", "k", "v"):
                v_.type_error(f"{name} must be an array, got None")
            arrs[name] = None
            continue
        try:
            arrs[name] = as_array(name, x)
        except TypeError as e:
            v_.type_error(str(e))
            arrs[name] = None
    v_.raise_if_any()

    present = {n: a for n, a in arrs.items() if a is not None}
    libs = {n: ("cupy" if is_device_array(a) else "numpy") for n, a in present.items()}
    if len(set(libs.values())) > 1:
        v_.type_error(f"all arrays must live in one place (all host or all device), got {libs}")
    devs = {n: device_id(a) for n, a in present.items()}
    if len(set(devs.values())) > 1:
        v_.type_error(f"all arrays must be on one device, got {devs}")
    v_.raise_if_any()
    on_device = libs["q"] == "cupy"

    if not allow_gk_gv:
        for n in ("gk", "gv"):
            if arrs[n] is not None:
                v_.not_supported(f"{n} is only supported by the recurrent mode "
                                 "(fused_recurrent_gated_delta_rule), not by the chunked mode")

    dims: dict[str, int] = {}
    v_.shape("q", arrs["q"], ("B", "T", "H", "K"), dims)
    v_.shape("k", arrs["k"], ("B", "T", "H", "K"), dims)
    v_.shape("v", arrs["v"], ("B", "T", "HV", "V"), dims)
    if "H" in dims and "HV" in dims and dims["HV"] % dims["H"] != 0:
        v_.error(f"the number of value heads HV={dims['HV']} must be a multiple of the key heads H={dims['H']} "
                 f"(v is [B, T, HV, V], q and k are [B, T, H, K])")
    if arrs["g"] is not None:
        v_.shape("g", arrs["g"], ("B", "T", "HV"), dims)
    if arrs["gk"] is not None:
        v_.shape("gk", arrs["gk"], ("B", "T", "HV", "K"), dims)
    if arrs["gv"] is not None:
        v_.shape("gv", arrs["gv"], ("B", "T", "HV", "V"), dims)
    if arrs["beta"] is not None:
        if arrs["beta"].ndim == 4 and allow_beta_per_v:
            v_.shape("beta", arrs["beta"], ("B", "T", "HV", "V"), dims)
        elif arrs["beta"].ndim == 4:
            v_.not_supported("beta of shape [B, T, HV, V] (per value dimension) is only supported by the "
                             "recurrent mode")
        else:
            v_.shape("beta", arrs["beta"], ("B", "T", "HV"), dims)
    for n in _ARRAY_ARGS:
        if arrs[n] is not None:
            v_.float_dtype(n, arrs[n])
    if not (arrs["q"].dtype == arrs["k"].dtype == arrs["v"].dtype):
        qkv_dt = {n: np.dtype(arrs[n].dtype).name for n in ("q", "k", "v")}
        v_.error(f"q, k and v must share one dtype, got {qkv_dt}")

    # Variable-length packing.
    cu_host = None
    cu = None
    B = dims.get("B", 0)
    T = dims.get("T", 0)
    N = B
    if cu_seqlens is not None:
        try:
            cu_arr = as_array("cu_seqlens", cu_seqlens)
        except TypeError as e:
            v_.type_error(str(e))
            v_.raise_if_any()
        if cu_seqlens_cpu is not None:
            cu_host = np.asarray(as_array("cu_seqlens_cpu", cu_seqlens_cpu))
        else:
            cu_host = np.asarray(cu_arr.get() if is_device_array(cu_arr) else cu_arr)
        if cu_host.ndim != 1 or cu_host.shape[0] < 1:
            v_.error(f"cu_seqlens must be a 1-D vector [N + 1], got shape {tuple(cu_host.shape)}")
        elif cu_host.dtype.kind not in "iu":
            v_.error(f"cu_seqlens must be int32 or int64, got {cu_host.dtype}")
        else:
            if int(cu_host[0]) != 0:
                v_.error(f"cu_seqlens must start at 0, got {int(cu_host[0])}")
            if np.any(np.diff(cu_host.astype(np.int64)) < 0):
                v_.error("cu_seqlens must be non-decreasing")
            if int(cu_host[-1]) != T:
                v_.error(f"cu_seqlens must end at T={T}, got {int(cu_host[-1])}")
            if B != 1:
                v_.error(f"cu_seqlens requires B == 1 (sequences packed along T), got B={B}")
            N = int(cu_host.shape[0]) - 1
        cu_host = cu_host.astype(np.int64)
        if on_device and is_device_array(cu_arr):
            # the caller's device offsets are used as they are (no upload; capturable in CUDA graphs)
            cu = contiguous(cu_arr) if cu_arr.dtype == np.int64 else cu_arr.astype(np.int64)
        elif on_device:
            import cupy

            cu = cupy.asarray(cu_host)
        else:
            cu = cu_host
    dims["N"] = N

    if arrs["initial_state"] is not None:
        v_.shape("initial_state", arrs["initial_state"], ("N", "HV", "K", "V"), dims)
    for n in ("A_log", "dt_bias"):
        if arrs[n] is not None:
            v_.shape(n, arrs[n], ("HV",), dims)
    if use_gate_in_kernel:
        if arrs["A_log"] is None:
            v_.error("use_gate_in_kernel=True needs A_log [HV]")
        if arrs["g"] is None:
            v_.error("use_gate_in_kernel=True needs the raw gate g [B, T, HV]")
    elif arrs["A_log"] is not None or arrs["dt_bias"] is not None:
        v_.error("A_log / dt_bias are only used with use_gate_in_kernel=True")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        v_.error("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    if scale is not None and not (float(scale) > 0):
        v_.error(f"scale must be > 0, got {scale}")
    if inplace_final_state:
        st = arrs["initial_state"]
        if st is None:
            v_.error("inplace_final_state=True needs initial_state [N, HV, K, V] to write into")
        elif st.dtype != _F32 or not st.flags.c_contiguous:
            v_.error("inplace_final_state=True needs a C-contiguous float32 initial_state")

    try:
        resolved = resolve_backend(backend, on_device)
    except ValueError as e:
        v_.error(str(e))
        resolved = backend
    if resolved == "cuda":
        if not on_device:
            v_.error("backend='cuda' needs device arrays (CuPy or a __cuda_array_interface__/__dlpack__ CUDA array), "
                     "got host arrays")
        elif arrs["q"].dtype not in _CUDA_DTYPES:
            v_.not_supported(f"backend='cuda' supports q/k/v dtypes {FLOAT_DTYPE_NAMES}, got {arrs['q'].dtype}")
        if dims.get("K", 0) > MAX_K_CUDA:
            v_.not_supported(f"backend='cuda' supports K <= {MAX_K_CUDA} (a state column or a chunk's key tile "
                             f"must fit on chip), got K={dims['K']}")
    if resolved == "numpy" and on_device:
        v_.error("backend='numpy' needs host (numpy) arrays, got device arrays")
    v_.raise_if_any()

    input_dtypes = {n: (a.dtype if a is not None else None) for n, a in arrs.items()}
    norm: dict[str, Any] = {}
    for n, a in arrs.items():
        if a is None:
            norm[n] = None
        elif n in _FLOAT32_ARGS and a.dtype != _F32 and not (resolved == "numpy" and a.dtype == _F64):
            norm[n] = contiguous(a).astype(np.float32)
        else:
            norm[n] = contiguous(a)
    if inplace_final_state:
        norm["initial_state"] = arrs["initial_state"]

    return GDNProblem(
        **norm,
        cu_seqlens=cu,
        cu_seqlens_host=cu_host,
        B=dims["B"], T=dims["T"], H=dims["H"], HV=dims["HV"], K=dims["K"], V=dims["V"], N=N,
        scale=float(scale) if scale is not None else dims["K"] ** -0.5,
        use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
        use_gate_in_kernel=bool(use_gate_in_kernel),
        use_beta_sigmoid_in_kernel=bool(use_beta_sigmoid_in_kernel),
        allow_neg_eigval=bool(allow_neg_eigval),
        output_final_state=bool(output_final_state or inplace_final_state),
        inplace_final_state=bool(inplace_final_state),
        backend=resolved,
        stream=stream,
        input_dtypes=input_dtypes,
    )
