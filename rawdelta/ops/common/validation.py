"""Validation of a call of any op, at the public boundary, before any launch (api.md section 6).

:func:`validate` takes an :class:`~.opdef.OpDef` and the call's arguments by name, collects every reason a call
is wrong (naming the argument, the expected ``[B, T, H, K]`` shape with the bound values, and what was given),
raises them together, and otherwise returns the op family's :class:`~.problem.Problem`: inputs as C-contiguous
arrays of one library and device, float32 arguments cast to float32, dimensions bound, options resolved, the
backend chosen. What only one family checks runs in its hook (:attr:`~.opdef.Family.check`), which sees a
:class:`Check`.

:func:`check_cotangents`, :func:`cast_outputs` and :func:`cast_grads` are the backward's and the results' side.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._arrays import BFLOAT16, as_array, contiguous, device_id, is_device_array
from ..._validate import FLOAT_DTYPE_NAMES, Validator
from ...errors import BackendUnavailableError
from .backend import BACKENDS, numba_unavailable_reason, resolve_backend
from .opdef import Array, OpDef
from .problem import Problem

_CUDA_DTYPES = frozenset(np.dtype(n) for n in ("float32", "float16")) | {BFLOAT16}
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


@dataclass
class Check:
    """What a family's validation hook sees, and how it reports.

    Attributes:
        op: the op being called.
        arrays: its arrays by name as given (NumPy or CuPy, not yet made contiguous or cast; None when absent).
        dims: the dimensions bound by the shapes (``B``, ``T``, ``H``, ``K`` ..., ``N``); a dimension is missing
            where the array that binds it had a bad shape.
        options: its static options by name, as given.
        backend: the backend that will run (``"numpy"``, ``"numba"``, ``"cuda"``; the request when invalid).
    """

    op: OpDef
    arrays: dict[str, Any]
    dims: dict[str, int]
    options: dict[str, Any]
    backend: str
    validator: Validator

    def error(self, msg: str) -> None:
        """A ValueError reason."""
        self.validator.error(msg)

    def not_supported(self, msg: str) -> None:
        """A NotImplementedError reason: a valid call this backend or mode does not support."""
        self.validator.not_supported(msg)

    def shape(self, name: str, arr: Any, names: tuple[str, ...]) -> bool:
        """Check ``arr.shape`` against `names`, binding new dimensions (see :meth:`Validator.shape`)."""
        return self.validator.shape(name, arr, names, self.dims)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _intake(op: OpDef, args: dict[str, Any], v: Validator) -> dict[str, Any]:
    arrs: dict[str, Any] = {}
    for a in op.arrays:
        x = args.get(a.name)
        if x is None:
            if a.required:
                v.type_error(f"{a.name} must be an array, got None")
            arrs[a.name] = None
            continue
        try:
            arrs[a.name] = as_array(a.name, x)
        except TypeError as e:
            v.type_error(str(e))
            arrs[a.name] = None
    return arrs


def _check_places(arrs: dict[str, Any], v: Validator) -> bool:
    """All arrays in one library and on one device; returns whether they are device arrays."""
    present = {n: a for n, a in arrs.items() if a is not None}
    if all(type(a) is np.ndarray for a in present.values()):  # the hot path of the host backends
        return False
    libs = {n: ("cupy" if is_device_array(a) else "numpy") for n, a in present.items()}
    if len(set(libs.values())) > 1:
        v.type_error(f"all arrays must live in one place (all host or all device), got {libs}")
    devs = {n: device_id(a) for n, a in present.items()}
    if len(set(devs.values())) > 1:
        v.type_error(f"all arrays must be on one device, got {devs}")
    return bool(present) and next(iter(libs.values())) == "cupy"


def state_layout(shape: tuple[str, ...], v_first: bool) -> tuple[str, ...]:
    """A state's shape in the caller's layout: ``[N, HV, K, V]``, or ``[N, HV, V, K]`` with ``state_v_first``."""
    return (*shape[:-2], shape[-1], shape[-2]) if v_first else shape


def _check_shape(a: Array, x: Any, dims: dict[str, int], v: Validator, v_first: bool = False) -> None:
    if a.alt_shape is not None and x.ndim == len(a.alt_shape):
        v.shape(a.name, x, a.alt_shape, dims)
    else:
        v.shape(a.name, x, state_layout(a.shape, v_first and a.state), dims)


def _check_shapes(op: OpDef, arrs: dict[str, Any], dims: dict[str, int], v: Validator, per_sequence: bool,
                  v_first: bool = False) -> None:
    """The shapes of the present arrays with a row per token or head (``per_sequence`` False), or of those with a row
    per sequence, checked once ``N`` is bound (``per_sequence`` True)."""
    for a in op.arrays:
        if arrs[a.name] is not None and (a.name in op.arrays_by_sequence) == per_sequence:
            _check_shape(a, arrs[a.name], dims, v, v_first)


def _bind_sequences(dims: dict[str, int], n_offsets: int | None, v: Validator) -> None:
    """Bind ``N``: B, or with ``cu_seqlens`` of length ``n_offsets`` its sequences (which needs B == 1)."""
    B = dims.get("B", 0)
    dims["N"] = B
    if n_offsets is not None:
        if B != 1:
            v.error(f"cu_seqlens requires B == 1 (sequences packed along T), got B={B}")
        dims["N"] = n_offsets - 1


def _check_dtypes(op: OpDef, arrs: dict[str, Any], v: Validator) -> None:
    for a in op.arrays:
        if arrs[a.name] is not None:
            v.float_dtype(a.name, arrs[a.name])


_WIDTH = {np.dtype(np.float16): 2, BFLOAT16: 2, _F32: 4, _F64: 8}


def compute_dtype(op: OpDef, arrs: dict[str, Any]) -> np.dtype:
    """The dtype the op computes in: that of its compute arrays (q, k, v) when they share one, else the widest of
    them (float16 with bfloat16: float32). The others are cast to it (copied); outputs and gradients still come
    back in each array's own dtype. `arrs` maps names to arrays or to dtypes."""
    dts = {np.dtype(getattr(x, "dtype", x)) for a in op.arrays if not a.float32 and (x := arrs.get(a.name)) is not None}
    if len(dts) == 1:
        return next(iter(dts))
    widest = max(dts, key=lambda dt: _WIDTH.get(dt, 8))
    return _F32 if _WIDTH.get(widest) == 2 else widest


def _cu_seqlens(args: dict[str, Any], dims: dict[str, int], on_device: bool, v: Validator
                ) -> tuple[Any, np.ndarray | None]:
    """The validated offsets (device copy where the arrays live on the device) and their host copy; binds ``N``."""
    T = dims.get("T", 0)
    dims["N"] = dims.get("B", 0)
    cu_seqlens, cu_seqlens_cpu = args.get("cu_seqlens"), args.get("cu_seqlens_cpu")
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            v.error("cu_seqlens_cpu is given without cu_seqlens")
        return None, None
    try:
        cu_arr = as_array("cu_seqlens", cu_seqlens)
    except TypeError as e:
        v.type_error(str(e))
        return None, None
    if cu_arr.ndim != 1 or cu_arr.shape[0] < 1:
        v.error(f"cu_seqlens must be a 1-D vector [N + 1], got shape {tuple(cu_arr.shape)}")
        return None, None
    if np.dtype(cu_arr.dtype).kind not in "iu":
        v.error(f"cu_seqlens must be int32 or int64, got {np.dtype(cu_arr.dtype).name}")
        return None, None
    if cu_seqlens_cpu is not None:
        try:
            cu_host = np.asarray(as_array("cu_seqlens_cpu", cu_seqlens_cpu))
        except TypeError as e:
            v.type_error(str(e))
            return None, None
        if cu_host.shape != tuple(cu_arr.shape) or cu_host.dtype.kind not in "iu":
            v.error(f"cu_seqlens_cpu must be the host copy of cu_seqlens (an integer vector of shape "
                    f"{tuple(cu_arr.shape)}), got shape {tuple(cu_host.shape)} of {cu_host.dtype}")
            return None, None
    else:
        cu_host = np.asarray(cu_arr.get() if is_device_array(cu_arr) else cu_arr)
    if int(cu_host[0]) != 0:
        v.error(f"cu_seqlens must start at 0, got {int(cu_host[0])}")
    if np.any(np.diff(cu_host.astype(np.int64)) < 0):
        v.error("cu_seqlens must be non-decreasing")
    if int(cu_host[-1]) != T:
        v.error(f"cu_seqlens must end at T={T}, got {int(cu_host[-1])}")
    _bind_sequences(dims, int(cu_host.shape[0]), v)
    cu_host = cu_host.astype(np.int64)
    if on_device and is_device_array(cu_arr):
        # the caller's device offsets are used as they are (no upload; capturable in CUDA graphs)
        cu = contiguous(cu_arr) if cu_arr.dtype == np.int64 else cu_arr.astype(np.int64)
    elif on_device:
        import cupy

        cu = cupy.asarray(cu_host)
    else:
        cu = cu_host
    return cu, cu_host


def check_static_options(op: OpDef, args: dict[str, Any], v: Validator) -> dict[str, Any]:
    """Check the static options common to every op (``scale``, ``chunk_size``) into `v`; returns every static option
    of the op given in `args` (the others at their defaults), flags as bool."""
    opts: dict[str, Any] = {}
    for o in op.static_options:
        if o.name in ("backend", "stream") or o.alias_of is not None:
            continue
        x = args.get(o.name, o.default)
        if o.annotation == "bool":
            x = bool(x)
        opts[o.name] = x
    for o in op.static_options:
        old = args.get(o.name)
        if o.alias_of is None or old is None:
            continue
        if opts[o.alias_of]:
            v.error(f"{o.name} is the older name of {o.alias_of}: give one of them, got both")
        else:
            warnings.warn(f"{o.name} is deprecated: use {o.alias_of}", DeprecationWarning, stacklevel=4)
            opts[o.alias_of] = bool(old)
    if "scale" in opts:
        scale = opts["scale"]
        if scale is not None:
            if not isinstance(scale, numbers.Real) or isinstance(scale, (bool, np.bool_)):
                v.error(f"scale must be a positive finite number, got {scale!r} ({type(scale).__name__})")
            elif not (math.isfinite(float(scale)) and float(scale) > 0):
                v.error(f"scale must be > 0 and finite, got {scale}")
    if "chunk_size" in opts:
        cs = opts["chunk_size"]
        if cs is None and op.option("chunk_size").default is None:
            pass  # the op picks it from the shapes (its family's Problem resolves it)
        elif not (_is_int(cs) and int(cs) in op.chunk_sizes):
            v.error(f"chunk_size must be one of {op.chunk_sizes} (a Python int), got {cs!r}")
        else:
            opts["chunk_size"] = int(cs)
    return opts


def _check_backend(op: OpDef, requested: Any, on_device: bool, arrs: dict[str, Any], dims: dict[str, int],
                   v: Validator) -> str:
    if requested not in BACKENDS:
        v.error(f"backend must be one of {BACKENDS}, got {requested!r}")
        return str(requested)
    resolved = resolve_backend(requested, on_device)
    if resolved not in op.backends:  # what else a backend the op lacks would need is beside the point
        v.not_supported(f"{op.name} has no {resolved!r} backend (it has {tuple(op.backends)})")
        return resolved
    compute = compute_dtype(op, arrs)
    names = "/".join(a.name for a in op.arrays if not a.float32)
    if resolved == "cuda":
        if not on_device:
            v.error("backend='cuda' needs device arrays (CuPy or a __cuda_array_interface__/__dlpack__ CUDA array), "
                    "got host arrays")
        elif compute not in _CUDA_DTYPES:
            v.not_supported(f"backend='cuda' supports {names} dtypes {FLOAT_DTYPE_NAMES}, got {compute}")
    if resolved == "numba" and compute == _F64:
        v.not_supported(f"backend='numba' computes in float32: it takes {names} in {FLOAT_DTYPE_NAMES}, got float64 "
                        "(the numpy backend computes in float64)")
    if resolved == "numpy" and on_device:
        v.error("backend='numpy' needs host (numpy) arrays, got device arrays")
    for dim, (limit, why) in op.limits.get(resolved, {}).items():
        if dims.get(dim, 0) > limit:
            v.not_supported(f"backend={resolved!r} supports {dim} <= {limit} ({why}), got {dim}={dims[dim]}")
    return resolved


def validate(op: OpDef, args: dict[str, Any]) -> Problem:
    """Check a call of `op` (its arguments by name; missing ones take their defaults) and return its problem.

    Raises (with every reason at once): TypeError for non-arrays and mixed libraries or devices; ValueError for
    shapes, dtypes, ``cu_seqlens``, options and backends; :class:`~rawdelta.errors.UnsupportedConfigError` (a
    NotImplementedError) for valid calls a backend or mode does not support.
    """
    v = Validator()
    arrs = _intake(op, args, v)
    v.raise_if_any()
    on_device = _check_places(arrs, v)
    v.raise_if_any()

    opts = check_static_options(op, args, v)
    dims: dict[str, int] = {}
    _check_shapes(op, arrs, dims, v, per_sequence=False)
    _check_dtypes(op, arrs, v)
    cu, cu_host = _cu_seqlens(args, dims, on_device, v)
    _check_shapes(op, arrs, dims, v, per_sequence=True, v_first=bool(opts.get("state_v_first")))
    if opts.get("inplace_final_state"):
        st = arrs.get("initial_state")
        if st is None:
            v.error("inplace_final_state=True needs initial_state to write into")
        elif st.dtype != _F32 or not st.flags.c_contiguous:
            v.error("inplace_final_state=True needs a C-contiguous float32 initial_state")
    backend = _check_backend(op, args.get("backend", "auto"), on_device, arrs, dims, v)
    if op.family.check is not None:
        op.family.check(Check(op, arrs, dims, opts, backend, v))
    v.raise_if_any()
    if backend == "numba":
        reason = numba_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend='numba' cannot run here: {reason}")
    return _problem(op, arrs, dims, opts, cu, cu_host, backend, args.get("stream"))


def validate_abstract(op: OpDef, arrays: dict[str, Any], n_offsets: int | None, statics: dict[str, Any]) -> None:
    """The checks of :func:`validate` that need only the arrays' shapes and dtypes (no values, no device), for
    callers that have shapes before data: the JAX adapter under ``jax.jit`` (tracers), where shapes are static.
    `arrays` maps the present arrays to objects with ``shape``, ``ndim`` and ``dtype``; ``n_offsets`` is the length of
    ``cu_seqlens`` (None without it). Raises the same errors :func:`validate` would."""
    v = Validator()
    arrs = {a.name: arrays.get(a.name) for a in op.arrays}
    for a in op.arrays:
        if a.required and arrs[a.name] is None:
            v.type_error(f"{a.name} must be an array, got None")
    v.raise_if_any()
    opts = check_static_options(op, statics, v)
    dims: dict[str, int] = {}
    _check_shapes(op, arrs, dims, v, per_sequence=False)
    _check_dtypes(op, arrs, v)
    _bind_sequences(dims, n_offsets, v)
    _check_shapes(op, arrs, dims, v, per_sequence=True, v_first=bool(opts.get("state_v_first")))
    if op.family.check is not None:
        op.family.check(Check(op, arrs, dims, opts, "auto", v))
    v.raise_if_any()


def _problem(op: OpDef, arrs: dict[str, Any], dims: dict[str, int], opts: dict[str, Any], cu: Any,
             cu_host: np.ndarray | None, backend: str, stream: Any) -> Problem:
    attrs: dict[str, Any] = dict.fromkeys(a.name for a in op.family.arrays)
    input_dtypes = {}
    compute = compute_dtype(op, arrs)
    native = bool(opts.get("state_v_first")) and op.backends[backend].native_state_v_first
    for a in op.arrays:
        x = arrs[a.name]
        input_dtypes[a.name] = None if x is None else x.dtype
        if x is None:
            continue
        if a.state and opts.get("state_v_first") and not native:
            # this backend holds states as [N, HV, K, V]: a transposed copy in, the results transposed back out
            x = x.swapaxes(-1, -2).astype(np.float32 if x.dtype != _F64 or backend != "numpy" else x.dtype,
                                          order="C")
        elif a.float32 and x.dtype != _F32 and not (backend == "numpy" and x.dtype == _F64):
            x = contiguous(x).astype(np.float32)
        elif not a.float32 and x.dtype != compute:
            x = contiguous(x).astype(compute)
        elif opts.get("inplace_final_state") and a.state:
            pass  # written in place: the caller's array itself (checked contiguous float32 above)
        else:
            x = contiguous(x)
        attrs[a.name] = x
    attrs.update(dims)
    attrs.update(opts)
    if "scale" in opts:
        attrs["scale"] = float(opts["scale"]) if opts["scale"] is not None else dims["K"] ** -0.5
    if "output_final_state" in opts:
        attrs["output_final_state"] = bool(opts["output_final_state"] or opts.get("inplace_final_state"))
    attrs.setdefault("inplace_final_state", False)
    attrs.setdefault("state_v_first", False)
    attrs["state_layout_native"] = native
    # where an in-place call writes the final state: the caller's initial_state (in the caller's layout)
    attrs["inplace_target"] = arrs.get("initial_state") if opts.get("inplace_final_state") else None
    attrs.update(op=op, dims=dict(dims), backend=backend, stream=stream, cu_seqlens=cu, cu_seqlens_host=cu_host,
                 input_dtypes=input_dtypes)
    return op.family.problem(**attrs)


# ------------------------------------------------------------------------------------------------------------------
# Results and cotangents
# ------------------------------------------------------------------------------------------------------------------


def check_cotangents(p: Problem, do: Any, dht: Any) -> tuple[Any, Any]:
    """Validate the cotangents of the op's outputs (``do`` like o, ``dht`` like the final state, or None);
    returns C-contiguous arrays of the forward's library."""
    val = Validator()
    outs = p.op.outputs
    try:
        do = contiguous(as_array("do", do))
        dht = None if dht is None else contiguous(as_array("dht", dht))
    except TypeError as e:
        val.type_error(str(e))
        val.raise_if_any()
    dims = dict(p.dims)
    val.shape("do", do, outs[0].shape, dims)
    if dht is not None:
        if len(outs) < 2:
            val.error(f"dht: {p.op.name} has no final state, so its backward takes no dht")
        else:
            val.shape("dht", dht, state_layout(outs[1].shape, p.state_v_first), dims)
    if type(do) is not type(p.q) or (dht is not None and type(dht) is not type(p.q)):
        val.type_error("do and dht must live where the forward inputs live (all host or all device)")
    val.raise_if_any()
    return do, swap_state_layout(p, dht)


def swap_state_layout(p: Problem, x: Any) -> Any:
    """A state (or its cotangent, or its gradient) between the backend's layout and the caller's: transposed,
    C-contiguous, with ``state_v_first`` on a backend that holds states as ``[N, HV, K, V]``; itself otherwise (the
    transpose is its own inverse; a backend with ``p.state_layout_native`` takes and returns the caller's layout)."""
    if not p.state_v_first or p.state_layout_native or x is None:
        return x
    return p.xp.ascontiguousarray(x.swapaxes(-1, -2))


def state_dtype(compute_dtype: Any) -> np.dtype:
    """The contract dtype of states: float32, float64 only for float64 inputs (numpy backend)."""
    return _F64 if np.dtype(compute_dtype) == _F64 else _F32


def cast_outputs(p: Problem, outputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A backend's outputs in the contract dtypes: each like its ``like`` array, states float32 (float64 for
    float64 inputs); None stays None."""
    out = []
    for spec, x in zip(p.op.outputs, outputs):
        if x is not None:
            dt = np.dtype(p.input_dtypes[spec.like]) if spec.like else state_dtype(p.q.dtype)
            x = x if x.dtype == dt else x.astype(dt)
            if spec.like is None:
                x = swap_state_layout(p, x)
        out.append(x)
    return tuple(out)


def cast_grads(p: Problem, grads: dict[str, Any]) -> dict[str, Any]:
    """A backend's gradients in their inputs' dtypes (states float32; float64 stays float64), keyed by the family's
    gradient fields; None where the input was None or is not an argument of the op."""
    out: dict[str, Any] = {}
    for a in p.op.family.arrays:
        if not a.differentiable:
            continue
        gr = grads.get(a.name)
        if gr is None or getattr(p, a.name) is None:
            out[a.name] = None
            continue
        in_dt = p.input_dtypes[a.name]
        dt = _F64 if in_dt == _F64 else (_F32 if a.state else np.dtype(in_dt))
        gr = gr if gr.dtype == dt else gr.astype(dt)
        out[a.name] = swap_state_layout(p, gr) if a.state else gr
    return out
