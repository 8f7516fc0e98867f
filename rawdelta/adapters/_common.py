"""Framework-free glue shared by the torch and JAX adapters (imports neither framework).

Both adapters reduce a call of any op to: the op's :class:`~rawdelta.ops.common.opdef.OpDef`, a dict of its
present array inputs (raw NumPy or CuPy arrays), the ``cu_seqlens`` arrays and a dict of its static options
(:attr:`OpDef.adapter_options`); then validate and run the core forward or backward on them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .._validate import Validator
from ..ops.common.api import (
    arguments_source,
    backend_stream,
    compile_function,
    docstring,
    run_backward,
    run_forward,
    signature_source,
)
from ..ops.common.opdef import KEYWORD_ONLY, OpDef
from ..ops.common.validation import check_static_options, compute_dtype, state_dtype, state_layout, validate

CU_SEQLENS = ("cu_seqlens", "cu_seqlens_cpu")


def tensor_names(op: OpDef) -> tuple[str, ...]:
    """The array arguments of the adapters' calls: the op's arrays, then the offsets, in the op's signature order."""
    return tuple(n for n in op.params if n in op.array_names or n in CU_SEQLENS)


def check_statics(op: OpDef, statics: dict[str, Any]) -> dict[str, Any]:
    """The core's validation of the static options alone (raises its ValueError), for the adapters to run before
    handing the options to a framework that would reject a bad one with its own message; returns them resolved
    (an older option name folded into the option)."""
    v = Validator()
    opts = check_static_options(op, statics, v)
    v.raise_if_any()
    return opts


def _args(op: OpDef, arrays: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any, statics: dict[str, Any],
          backend: str) -> dict[str, Any]:
    extra = [n for n, a in arrays.items() if a is not None and n not in op.array_names]
    if extra:
        raise ValueError(f"{', '.join(extra)}: not an input of {op.name}")
    return {**arrays, "cu_seqlens": cu_seqlens, "cu_seqlens_cpu": cu_seqlens_cpu, **statics, "backend": backend}


def forward(op: OpDef, arrays: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any, statics: dict[str, Any],
            backend: str, *, workspace: Any = None, for_backward: bool = False) -> tuple[Any, ...]:
    """Validate and run the core forward on raw arrays; returns the outputs (the final state None unless asked for).

    Launches go on the current CuPy stream (the adapters make their framework's stream current). ``workspace``:
    a 1-D uint8 array of :func:`workspace_nbytes` bytes that receives what the backward takes back (given only
    for a forward whose backward follows); ``for_backward``: a backward follows (``Problem.for_backward``).
    """
    p = validate(op, _args(op, arrays, cu_seqlens, cu_seqlens_cpu, statics, backend))
    outs, _ = run_forward(p, workspace, for_backward)
    return outs


def backward(op: OpDef, arrays: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any, statics: dict[str, Any],
             backend: str, do: Any, dht: Any, workspace: Any = None) -> dict[str, Any]:
    """Validate and run the core backward on raw arrays; returns ``{name: gradient}`` for every present
    differentiable input.

    The residuals are rebuilt from the saved inputs (every op's residuals are its validated inputs plus what the
    backend saved), so the forward does not run again; what the forward saved comes from `workspace` where the
    backend keeps it there, and is recomputed otherwise.
    """
    # the backward of the call, not an in-place decode; a copy, so the caller's dict is left as it was
    statics = {n: x for n, x in statics.items() if n != "inplace_final_state"}
    if "output_final_state" in statics:
        statics["output_final_state"] = False
    p = validate(op, _args(op, arrays, cu_seqlens, cu_seqlens_cpu, statics, backend))
    saved = None
    read = op.backends[p.backend].resolve("saved_from_workspace")
    if read is not None and workspace is not None:
        with backend_stream(p):
            saved = read(p, workspace)
    grads = run_backward(p, saved, do, dht)
    return {n: grads[n] for n in op.differentiable if arrays.get(n) is not None}


def workspace_nbytes(op: OpDef, shapes: dict[str, tuple[int, ...]], dtype: Any, statics: dict[str, Any],
                     compute_capability: str | None) -> int:
    """Bytes of the buffer the forward fills for the backward (0: none), for the adapters to allocate with their
    framework for a forward whose backward follows: the cuda backend's ``workspace_nbytes`` given the arrays'
    shapes (``cu_seqlens`` among them where given: ``[N + 1]``), the compute dtype, the static options and the
    device's compute capability (``"90"``; None off the GPU)."""
    backend = op.backends.get("cuda")
    if backend is None or compute_capability is None:
        return 0
    size = backend.resolve("workspace_nbytes")
    if size is None:
        return 0
    return int(size(shapes, np.dtype(dtype), statics, compute_capability))


def bind_dims(op: OpDef, shapes: dict[str, tuple[int, ...]], n_offsets: int | None, v_first: bool = False
              ) -> dict[str, int]:
    """The dimensions bound by the arrays' shapes (no checks: the core validates; states in the caller's layout) and
    ``N``: the sequences of ``cu_seqlens`` (its length minus one) or B."""
    dims: dict[str, int] = {}
    for a in op.arrays:
        shape = shapes.get(a.name)
        if shape is None:
            continue
        names = a.alt_shape if a.alt_shape is not None and len(shape) == len(a.alt_shape) else a.shape
        names = state_layout(names, v_first and a.state)
        for name, size in zip(names, shape):
            dims.setdefault(name, size)
    dims["N"] = dims.get("B", 0) if n_offsets is None else n_offsets - 1
    return dims


def output_specs(op: OpDef, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any], n_offsets: int | None,
                 statics: dict[str, Any] | None = None) -> list[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of each output of `op` given its inputs' shapes and dtypes and its static options (for fake
    kernels and ``jax.ShapeDtypeStruct``): the declared shape bound from the inputs (a state's in the caller's
    layout), the dtype of its ``like`` array or the state dtype."""
    v_first = bool((statics or {}).get("state_v_first"))
    dims = bind_dims(op, shapes, n_offsets, v_first)
    compute = compute_dtype(op, dtypes)
    out = []
    for spec in op.outputs:
        dt = np.dtype(dtypes[spec.like]) if spec.like else state_dtype(compute)
        shape = state_layout(spec.shape, v_first) if spec.like is None else spec.shape
        out.append((tuple(dims[s] for s in shape), dt))
    return out


def adapter_function(op: OpDef, array_type: str, where: str, body: str, call: Callable[[Any, dict[str, Any]], Any],
                     target: Any, namespace: dict[str, Any], module: str) -> Callable[..., Any]:
    """An adapter's public function for `op`: the core signature without ``backend`` and ``stream``, arrays annotated
    `array_type` (``"Tensor"``, ``"jax.Array"``, resolvable in `namespace`), its docstring (the op's summary "(on
    `where`)", then `body`), calling ``call(target, {argument name: value})``."""
    names = tuple(n for n in op.signature if n == KEYWORD_ONLY or n not in ("backend", "stream"))
    returns = f"tuple[{array_type}, {array_type} | None]" if op.has_state else array_type

    def annotation(name: str) -> str:
        if name in op.array_names:
            return array_type if op.family.array(name).required else f"{array_type} | None"
        if name in CU_SEQLENS:
            return f"{array_type} | None"
        return op.option(name).annotation

    doc = docstring(op, f"{op.summary.rstrip('.')} (on {where}).", body, names, array_type=array_type)
    ns = {**namespace, "_target": target, "_call": call, "Any": Any}
    return compile_function(op.name, signature_source(op, names, annotation),
                            f"return _call(_target, {arguments_source(names)})", ns,
                            doc, module, returns)


def cupy_external_stream(ptr: int, device_id: int) -> Any:
    """A CuPy stream object for a raw ``cudaStream_t`` owned by torch or XLA.

    CuPy 14 deprecates ``ExternalStream`` in favour of ``Stream.from_external``, which needs a
    ``__cuda_stream__`` object and cannot be told the device; ``ExternalStream`` can, so keep it and
    silence the warning. Not cached: entering one CuPy stream object from two threads at once would
    mix up the streams they restore on exit.
    """
    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(int(ptr), int(device_id))
