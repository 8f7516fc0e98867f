"""JAX adapter: ``jax.custom_vjp`` over the core, eagerly through DLPack and under ``jax.jit`` through
``jax.experimental.buffer_callback``, for every registered op.

Each op ``X`` (:func:`rawdelta.ops.registry.ops`) gets ``rawdelta.jax.X`` from its declaration alone: the core
signature without ``backend`` and ``stream``, one ``custom_vjp`` function (:func:`_op_vjp`) whose static
(``nondiff_argnums``) argument carries the op, its static options and the host copy of ``cu_seqlens``, and the
glue in :mod:`rawdelta.adapters._common` runs the op's core forward or backward. Ops that return ``o`` only
(no final state) fit the same path.

Two execution paths, chosen per call from the arguments:

* **Eager** (every argument a concrete ``jax.Array``): GPU arrays go to CuPy zero-copy with
  ``cupy.from_dlpack`` and the ``cuda`` backend runs on CuPy's current stream; results come back with
  ``jax.dlpack.from_dlpack`` (zero-copy). The DLPack stream handshake orders both hand-overs against
  XLA's streams. CPU arrays run the ``numpy`` backend on ``np.asarray`` views.
* **Traced** (under ``jax.jit``, ``jax.vmap``, ...): a ``buffer_callback`` whose Python callback runs when
  XLA executes it. GPU buffers are wrapped as CuPy arrays and the kernels launch on the stream XLA hands
  the callback (``ctx.stream``); results are copied device-to-device into XLA's output buffers. CPU
  buffers run the ``numpy`` backend. GPU vs CPU is read from the buffers' DLPack device at run time, so
  one traced program works on either platform.

Static arguments (flags, ``scale``, ``chunk_size``) must be Python values, not tracers. ``cu_seqlens`` may
be traced; a concrete host copy (``cu_seqlens_cpu``, or a concrete ``cu_seqlens``) avoids a device-to-host
copy inside the callback.

Memory: inside the callback CuPy allocates from its own pool, outside XLA's. XLA preallocates 75% of
the GPU by default; set ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``)
to leave CuPy room.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from ..ops import registry
from ..ops.common.opdef import OpDef
from ..ops.common.validation import validate_abstract
from ._common import (
    adapter_function,
    backward,
    check_statics,
    cupy_external_stream,
    forward,
    output_specs,
    workspace_nbytes,
)

_DLPACK_CUDA = 2

try:
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - in case a later JAX drops the jax.core alias
    from jax._src.core import Tracer as _Tracer


@dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array: hashable, a ``nondiff_argnums`` argument."""

    op_name: str
    statics: tuple[tuple[str, Any], ...]  # the op's static options, by name
    cu_seqlens_host: tuple[int, ...] | None

    @property
    def op(self) -> OpDef:
        return _OPS[self.op_name]

    def options(self) -> dict[str, Any]:
        return dict(self.statics)

    def cu_host(self) -> np.ndarray | None:
        return None if self.cu_seqlens_host is None else np.asarray(self.cu_seqlens_host, dtype=np.int64)

    @property
    def output_final_state(self) -> bool:
        return bool(self.options().get("output_final_state"))


# ----------------------------------------------------------------------------------------------------------------------
# Array conversion
# ----------------------------------------------------------------------------------------------------------------------


def _is_traced(xs: list[Any]) -> bool:
    return any(isinstance(x, _Tracer) for x in xs)


def _device(x: jax.Array) -> Any:
    devs = x.devices()
    if len(devs) != 1:
        raise TypeError(f"rawdelta.jax needs arrays on one device, got an array sharded over {len(devs)} devices")
    return next(iter(devs))


def _to_cupy(x: Any) -> Any:
    """Zero-copy CuPy view of a GPU ``jax.Array`` or a GPU ``buffer_callback`` Buffer."""
    import cupy

    try:
        return cupy.from_dlpack(x)
    except Exception:
        # Fall back to __cuda_array_interface__, which cannot name bfloat16 (it may report raw 2-byte void).
        arr = cupy.asarray(x)
        want = np.dtype(x.dtype)
        return arr if arr.dtype == want else arr.view(want)


def _copy_into(dst: Any, src: Any) -> None:
    """Write a result into an XLA output buffer (a stream-ordered memcpy when no cast is needed)."""
    if isinstance(dst, np.ndarray):
        dst[...] = src
    elif dst.dtype == src.dtype and dst.shape == src.shape and src.flags.c_contiguous and dst.flags.c_contiguous:
        if src.nbytes:
            dst.data.copy_from_device_async(src.data, src.nbytes)
    else:
        dst[...] = src  # casts, e.g. the float32 dh0 into a bfloat16 initial_state's cotangent


@contextlib.contextmanager
def _buffers_context(ctx: Any, first: Any) -> Iterator[tuple[Callable[[Any], Any], str]]:
    """Inside a buffer_callback: ``(buffer -> raw array, backend)`` for the platform the buffers live on."""
    dev_type, dev_id = first.__dlpack_device__()
    if int(dev_type) != _DLPACK_CUDA:
        yield np.asarray, "numpy"
        return
    import cupy

    stream = ctx.stream
    stream = stream() if callable(stream) else stream
    # The stream is entered before any conversion, so CuPy's DLPack import waits on nothing.
    with cupy.cuda.Device(int(dev_id)), cupy_external_stream(int(stream), int(dev_id)):
        yield _to_cupy, "cuda"


# ----------------------------------------------------------------------------------------------------------------------
# Forward and backward on jax arrays (eager or traced)
# ----------------------------------------------------------------------------------------------------------------------


def _specs(static: _Static, arrays: dict[str, Any], cu: Any) -> list[jax.ShapeDtypeStruct]:
    shapes = {n: tuple(a.shape) for n, a in arrays.items()}
    dtypes = {n: a.dtype for n, a in arrays.items()}
    outs = output_specs(static.op, shapes, dtypes, None if cu is None else cu.shape[0], static.options())
    return [jax.ShapeDtypeStruct(s, d) for s, d in outs]


def _check_at_trace_time(static: _Static, arrays: dict[str, Any], cu: Any) -> None:
    """Shapes are static under a trace: the core's checks of them raise here, at trace time, with the core's
    errors (what needs the values, like the offsets in ``cu_seqlens``, is checked when the callback runs)."""
    if cu is not None and cu.ndim != 1:
        raise ValueError(f"cu_seqlens must be a 1-D vector [N + 1], got shape {tuple(cu.shape)}")
    validate_abstract(static.op, arrays, None if cu is None else cu.shape[0], static.options())


def _workspace_nbytes(static: _Static, arrays: dict[str, Any], cu: Any, device: Any) -> int:
    """Bytes of the forward's workspace for the backward on `device` (under a trace: the default backend's
    first device, since the buffers' platform is known only when the callback runs)."""
    cc = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    cc = None if cc is None else str(cc).replace(".", "")
    shapes = {n: tuple(a.shape) for n, a in arrays.items()}
    if cu is not None:
        shapes["cu_seqlens"] = tuple(cu.shape)
    return workspace_nbytes(static.op, shapes, arrays["q"].dtype, static.options(), cc)


def _forward(static: _Static, arrays: dict[str, Any], cu: Any, for_backward: bool) -> tuple[tuple[Any, ...], Any]:
    """``(outputs, workspace or None)``: the final state None unless asked for; the workspace carries what the cuda
    backend's forward keeps for its backward (None unless ``for_backward``: the VJP's forward)."""
    op, opts = static.op, static.options()
    names = tuple(arrays)
    leaves = list(arrays.values()) + ([] if cu is None else [cu])
    if not _is_traced(leaves):
        dev = _device(arrays["q"])
        if dev.platform == "cpu":
            raw = {n: np.asarray(x) for n, x in arrays.items()}
            outs = forward(op, raw, None if cu is None else np.asarray(cu), static.cu_host(), opts, "numpy")
            return tuple(None if x is None else jax.device_put(x, dev) for x in outs), None
        import cupy

        with cupy.cuda.Device(arrays["q"].__dlpack_device__()[1]):
            raw = {n: _to_cupy(x) for n, x in arrays.items()}
            nbytes = _workspace_nbytes(static, arrays, cu, dev) if for_backward else 0
            ws = cupy.empty((nbytes,), dtype=np.uint8) if nbytes else None
            outs = forward(op, raw, None if cu is None else _to_cupy(cu), static.cu_host(), opts, "cuda", workspace=ws,
                           for_backward=for_backward)
            return (tuple(None if x is None else jax.dlpack.from_dlpack(x) for x in outs),
                    None if ws is None else jax.dlpack.from_dlpack(ws))

    _check_at_trace_time(static, arrays, cu)
    specs = _specs(static, arrays, cu)
    keep = [i for i, o in enumerate(op.outputs) if o.name != "final_state" or static.output_final_state]
    specs = [specs[i] for i in keep]
    nbytes = _workspace_nbytes(static, arrays, cu, jax.devices()[0]) if for_backward else 0
    if nbytes:
        specs.append(jax.ShapeDtypeStruct((nbytes,), np.uint8))

    def callback(ctx: Any, out: Any, *bufs: Any) -> None:
        with _buffers_context(ctx, bufs[0]) as (conv, backend):
            xs = [conv(b) for b in bufs]
            raw = dict(zip(names, xs))
            ws = conv(out[-1]) if nbytes and backend == "cuda" else None
            outs = forward(op, raw, xs[-1] if cu is not None else None, static.cu_host(), opts, backend, workspace=ws,
                           for_backward=for_backward)
            for j, i in enumerate(keep):
                _copy_into(conv(out[j]), outs[i])

    res = buffer_callback(callback, tuple(specs), vmap_method="sequential")(*leaves)
    outs: list[Any] = [None] * len(op.outputs)
    for j, i in enumerate(keep):
        outs[i] = res[j]
    return tuple(outs), (res[-1] if nbytes else None)


def _backward(static: _Static, arrays: dict[str, Any], cu: Any, cts: tuple[Any, ...], ws: Any) -> dict[str, Any]:
    op, opts = static.op, static.options()
    names = tuple(arrays)
    do = cts[0]
    dht = cts[1] if op.has_state and static.output_final_state else None
    leaves = list(arrays.values()) + ([] if cu is None else [cu])
    tail = [do] + ([] if dht is None else [dht]) + ([] if ws is None else [ws])
    diff = [n for n in op.differentiable if n in arrays]
    if not _is_traced(leaves + tail):
        dev = _device(arrays["q"])
        if dev.platform == "cpu":
            raw = {n: np.asarray(x) for n, x in arrays.items()}
            grads = backward(op, raw, None if cu is None else np.asarray(cu), static.cu_host(), opts, "numpy",
                             np.asarray(do), None if dht is None else np.asarray(dht))
            out = {n: jax.device_put(gr, dev) for n, gr in grads.items()}
        else:
            import cupy

            with cupy.cuda.Device(arrays["q"].__dlpack_device__()[1]):
                raw = {n: _to_cupy(x) for n, x in arrays.items()}
                grads = backward(op, raw, None if cu is None else _to_cupy(cu), static.cu_host(), opts, "cuda",
                                 _to_cupy(do), None if dht is None else _to_cupy(dht),
                                 None if ws is None else _to_cupy(ws))
                out = {n: jax.dlpack.from_dlpack(gr) for n, gr in grads.items()}
        # states' gradients come back float32; a cotangent must have its primal's dtype.
        return {n: gr if gr.dtype == arrays[n].dtype else gr.astype(arrays[n].dtype) for n, gr in out.items()}

    specs = tuple(jax.ShapeDtypeStruct(arrays[n].shape, arrays[n].dtype) for n in diff)
    n_in = len(names)
    has_cu, has_dht, has_ws = cu is not None, dht is not None, ws is not None

    def callback(ctx: Any, out: Any, *bufs: Any) -> None:
        with _buffers_context(ctx, bufs[0]) as (conv, backend):
            xs = [conv(b) for b in bufs]
            raw = dict(zip(names, xs[:n_in]))
            rest = xs[n_in:]
            cu_ = rest.pop(0) if has_cu else None
            do_ = rest.pop(0)
            dht_ = rest.pop(0) if has_dht else None
            ws_ = rest.pop(0) if has_ws and backend == "cuda" else None
            grads = backward(op, raw, cu_, static.cu_host(), opts, backend, do_, dht_, ws_)
            for buf, n in zip(out, diff):
                _copy_into(conv(buf), grads[n])

    outs = buffer_callback(callback, specs, vmap_method="sequential")(*leaves, *tail)
    return dict(zip(diff, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _op_vjp(static: _Static, arrays: dict[str, Any], cu: Any) -> tuple[Any, ...]:
    outs, _ = _forward(static, arrays, cu, False)
    return outs


def _op_vjp_fwd(static: _Static, arrays: dict[str, Any], cu: Any) -> tuple[tuple[Any, ...], tuple[Any, Any, Any]]:
    # The residuals are the inputs (the backward recomputes the rest) and the forward's workspace.
    outs, ws = _forward(static, arrays, cu, True)
    return outs, (arrays, cu, ws)


def _op_vjp_bwd(static: _Static, res: tuple[Any, Any, Any], cts: tuple[Any, ...]) -> tuple[dict[str, Any], None]:
    arrays, cu, ws = res
    grads = _backward(static, arrays, cu, cts, ws)
    # inputs without a gradient (none today: every array input is differentiable) get zeros
    return {n: grads.get(n, jnp.zeros_like(a)) for n, a in arrays.items()}, None


_op_vjp.defvjp(_op_vjp_fwd, _op_vjp_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def _static_value(op: OpDef, name: str, x: Any) -> Any:
    if isinstance(x, _Tracer):
        raise TypeError(f"{name} must be a static Python value (not traced); under jax.jit mark it static, e.g. "
                        f"jax.jit(f, static_argnames='{name}')")
    kind = op.option(name).annotation
    if kind == "bool":
        return bool(x)
    if isinstance(x, (np.integer, np.floating)) and not isinstance(x, np.bool_):
        return x.item()  # numpy scalars -> Python, so equal values share one trace
    return x


def _host_cu_seqlens(cu_seqlens: Any, cu_seqlens_cpu: Any) -> tuple[int, ...] | None:
    src = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens
    if src is None or isinstance(src, _Tracer):
        return None
    host = np.asarray(src)
    if host.dtype.kind not in "iu" or host.ndim != 1:
        # the core names the problem (dtype or rank) when it validates; keep the values for it to see
        raise ValueError(f"{'cu_seqlens_cpu' if cu_seqlens_cpu is not None else 'cu_seqlens'} must be a 1-D int32 or "
                         f"int64 vector [N + 1], got shape {host.shape} of {host.dtype}")
    return tuple(int(c) for c in host)


def _call(op: OpDef, a: dict[str, Any]) -> Any:
    """A public call: the present arrays, the offsets and the static options through ``_op_vjp``."""
    statics = check_statics(op, {o.name: _static_value(op, o.name, a[o.name]) for o in op.adapter_options})
    if statics.pop("inplace_final_state", False):
        statics["output_final_state"] = True
    arrays = {n: jnp.asarray(a[n]) for n in op.array_names if a.get(n) is not None}
    cu_seqlens = a.get("cu_seqlens")
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens)
    static = _Static(op.name, tuple(statics.items()), _host_cu_seqlens(cu_seqlens, a.get("cu_seqlens_cpu")))
    outs = _op_vjp(static, arrays, cu)
    if op.has_state:
        return outs[0], (outs[1] if static.output_final_state else None)
    return outs[0]


def _public_function(op: OpDef) -> Callable[..., Any]:
    body = (f"Same arguments, defaults and return value as :func:`rawdelta.{op.name}`, without ``backend`` and "
            "``stream``: GPU arrays run the ``cuda`` backend (zero-copy), CPU arrays the ``numpy`` backend. "
            "Differentiable (``jax.grad``, ``jax.vjp``); works eagerly and under ``jax.jit``, where the static "
            "options (flags, ``scale``, ``chunk_size``) must be Python values."
            + (" ``inplace_final_state``: JAX arrays are immutable, so it only implies ``output_final_state`` "
               "(donate ``initial_state`` to ``jax.jit`` to let XLA reuse its buffer)." if "inplace_final_state"
               in op.params else ""))
    return adapter_function(op, "jax.Array", "JAX arrays", body, _call, op, {"jax": jax}, __name__)


_OPS: dict[str, OpDef] = {}


def entry_point(op: OpDef) -> Callable[..., Any]:
    """``rawdelta.jax``'s function for `op` (every registered op has one from import; an op declared elsewhere, a
    test's, gets its own here)."""
    _OPS[op.name] = op
    return _public_function(op)


_PUBLIC = {op.name: entry_point(op) for op in registry.ops()}
globals().update(_PUBLIC)
__all__ = sorted(_PUBLIC)
