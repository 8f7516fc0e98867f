"""JAX adapter: ``jax.custom_vjp`` over the core raw pairs, eagerly through DLPack and under ``jax.jit`` through
``jax.experimental.buffer_callback``.

Both ops (``fused_recurrent_gated_delta_rule`` and ``chunk_gated_delta_rule``) are one ``custom_vjp``
function whose static (``nondiff_argnums``) argument carries the mode and, for the chunked op, the
``chunk_size``; the glue in :mod:`rawdelta.adapters._common` runs that mode's raw pair.

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

from ..ops.gated_delta_rule.problem import CHUNK_SIZES
from ._common import (
    DIFF_NAMES,
    GDNFlags,
    backward,
    cupy_external_stream,
    final_state_dtype,
    forward,
    workspace_nbytes,
)

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]

_DLPACK_CUDA = 2

try:
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover - in case a later JAX drops the jax.core alias
    from jax._src.core import Tracer as _Tracer


@dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array: hashable, a ``nondiff_argnums`` argument."""

    flags: GDNFlags
    cu_seqlens_host: tuple[int, ...] | None

    def cu_host(self) -> np.ndarray | None:
        return None if self.cu_seqlens_host is None else np.asarray(self.cu_seqlens_host, dtype=np.int64)


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


def _final_state_struct(arrays: dict[str, Any], cu: Any) -> jax.ShapeDtypeStruct:
    q, v = arrays["q"], arrays["v"]
    N = q.shape[0] if cu is None else cu.shape[0] - 1
    return jax.ShapeDtypeStruct((N, v.shape[2], q.shape[3], v.shape[3]), final_state_dtype(v.dtype))


def _check_at_trace_time(arrays: dict[str, Any], flags: GDNFlags) -> None:
    # Full validation happens in the core when the callback runs, where an error surfaces as an XLA runtime
    # error; the output shapes need these ranks now, and a bad static chunk_size is worth catching now.
    bad = [f"{n} must be 4-D [B, T, {'H, K' if n != 'v' else 'HV, V'}], got shape {tuple(arrays[n].shape)}"
           for n in ("q", "k", "v") if arrays[n].ndim != 4]
    if flags.mode == "chunk" and flags.chunk_size not in CHUNK_SIZES:
        bad.append(f"chunk_size must be one of {CHUNK_SIZES}, got {flags.chunk_size!r}")
    if bad:
        raise ValueError("; ".join(bad))


def _workspace_nbytes(flags: GDNFlags, arrays: dict[str, Any], device: Any) -> int:
    """Bytes of the forward's workspace for the backward on `device` (under a trace: the default backend's
    first device, since the buffers' platform is known only when the callback runs)."""
    cc = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    cc = None if cc is None else str(cc).replace(".", "")
    q, v = arrays["q"], arrays["v"]
    return workspace_nbytes(flags, tuple(q.shape), tuple(v.shape), q.dtype, cc)


def _forward(static: _Static, arrays: dict[str, Any], cu: Any) -> tuple[Any, Any, Any]:
    """``(o, final state or None, workspace or None)``: the workspace carries the chunked mode's per-chunk factors
    from the forward to the backward on the GPU."""
    names = tuple(arrays)
    leaves = list(arrays.values()) + ([] if cu is None else [cu])
    flags = static.flags
    if not _is_traced(leaves):
        dev = _device(arrays["q"])
        if dev.platform == "cpu":
            raw = {n: np.asarray(x) for n, x in arrays.items()}
            o, ht = forward(raw, None if cu is None else np.asarray(cu), static.cu_host(), flags, "numpy")
            return jax.device_put(o, dev), (None if ht is None else jax.device_put(ht, dev)), None
        import cupy

        with cupy.cuda.Device(arrays["q"].__dlpack_device__()[1]):
            raw = {n: _to_cupy(x) for n, x in arrays.items()}
            nbytes = _workspace_nbytes(flags, arrays, dev)
            ws = cupy.empty((nbytes,), dtype=np.uint8) if nbytes else None
            o, ht = forward(raw, None if cu is None else _to_cupy(cu), static.cu_host(), flags, "cuda", workspace=ws)
            return (jax.dlpack.from_dlpack(o), (None if ht is None else jax.dlpack.from_dlpack(ht)),
                    None if ws is None else jax.dlpack.from_dlpack(ws))

    _check_at_trace_time(arrays, flags)
    v = arrays["v"]
    specs = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if flags.output_final_state:
        specs.append(_final_state_struct(arrays, cu))
    nbytes = _workspace_nbytes(flags, arrays, jax.devices()[0])
    if nbytes:
        specs.append(jax.ShapeDtypeStruct((nbytes,), np.uint8))

    def callback(ctx: Any, out: Any, *bufs: Any) -> None:
        with _buffers_context(ctx, bufs[0]) as (conv, backend):
            xs = [conv(b) for b in bufs]
            raw = dict(zip(names, xs))
            ws = conv(out[-1]) if nbytes and backend == "cuda" else None
            o, ht = forward(raw, xs[-1] if cu is not None else None, static.cu_host(), flags, backend, workspace=ws)
            _copy_into(conv(out[0]), o)
            if ht is not None:
                _copy_into(conv(out[1]), ht)

    outs = buffer_callback(callback, tuple(specs), vmap_method="sequential")(*leaves)
    return outs[0], (outs[1] if flags.output_final_state else None), (outs[-1] if nbytes else None)


def _backward(static: _Static, arrays: dict[str, Any], cu: Any, do: Any, dht: Any, ws: Any) -> dict[str, Any]:
    names = tuple(arrays)
    leaves = list(arrays.values()) + ([] if cu is None else [cu])
    tail = [do] + ([] if dht is None else [dht]) + ([] if ws is None else [ws])
    flags = static.flags
    if not _is_traced(leaves + tail):
        dev = _device(arrays["q"])
        if dev.platform == "cpu":
            raw = {n: np.asarray(x) for n, x in arrays.items()}
            grads = backward(raw, None if cu is None else np.asarray(cu), static.cu_host(), flags, "numpy",
                             np.asarray(do), None if dht is None else np.asarray(dht))
            out = {n: jax.device_put(gr, dev) for n, gr in grads.items()}
        else:
            import cupy

            with cupy.cuda.Device(arrays["q"].__dlpack_device__()[1]):
                raw = {n: _to_cupy(x) for n, x in arrays.items()}
                grads = backward(raw, None if cu is None else _to_cupy(cu), static.cu_host(), flags, "cuda",
                                 _to_cupy(do), None if dht is None else _to_cupy(dht),
                                 None if ws is None else _to_cupy(ws))
                out = {n: jax.dlpack.from_dlpack(gr) for n, gr in grads.items()}
        # dh0 comes back float32; a cotangent must have its primal's dtype.
        return {n: gr if gr.dtype == arrays[n].dtype else gr.astype(arrays[n].dtype) for n, gr in out.items()}

    specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays.values())
    n_in = len(names)
    has_cu = cu is not None
    has_dht = dht is not None
    has_ws = ws is not None

    def callback(ctx: Any, out: Any, *bufs: Any) -> None:
        with _buffers_context(ctx, bufs[0]) as (conv, backend):
            xs = [conv(b) for b in bufs]
            raw = dict(zip(names, xs[:n_in]))
            rest = xs[n_in:]
            cu_ = rest.pop(0) if has_cu else None
            do_ = rest.pop(0)
            dht_ = rest.pop(0) if has_dht else None
            ws_ = rest.pop(0) if has_ws and backend == "cuda" else None
            grads = backward(raw, cu_, static.cu_host(), flags, backend, do_, dht_, ws_)
            for buf, n in zip(out, names):
                _copy_into(conv(buf), grads[n])

    outs = buffer_callback(callback, specs, vmap_method="sequential")(*leaves, *tail)
    return dict(zip(names, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn(static: _Static, arrays: dict[str, Any], cu: Any) -> tuple[Any, Any]:
    o, ht, _ = _forward(static, arrays, cu)
    return o, ht


def _gdn_fwd(static: _Static, arrays: dict[str, Any], cu: Any) -> tuple[tuple[Any, Any], tuple[Any, Any, Any]]:
    # The residuals are the inputs (the backward recomputes the states) and the chunked mode's workspace.
    o, ht, ws = _forward(static, arrays, cu)
    return (o, ht), (arrays, cu, ws)


def _gdn_bwd(static: _Static, res: tuple[Any, Any, Any], cts: tuple[Any, Any]) -> tuple[dict[str, Any], None]:
    arrays, cu, ws = res
    do, dht = cts
    return _backward(static, arrays, cu, do, dht if static.flags.output_final_state else None, ws), None


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def _static_scale(scale: Any) -> float | None:
    if scale is None:
        return None
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"scale must be a static Python number (not traced), got {type(scale).__name__}") from None


def _static_chunk_size(chunk_size: Any) -> Any:
    if isinstance(chunk_size, _Tracer):
        raise TypeError("chunk_size must be a static Python int (not traced); under jax.jit mark it static, e.g. "
                        "jax.jit(f, static_argnames='chunk_size')")
    if isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool):
        return int(chunk_size)  # numpy integers -> int, so equal sizes share one trace
    return chunk_size  # anything else is left for the validation to reject with its message


def _call(given: dict[str, Any], cu_seqlens: Any, cu_seqlens_cpu: Any, flags: GDNFlags) -> tuple[Any, Any]:
    """Both public ops: the present floating inputs, the offsets and the static flags through ``_gdn``."""
    arrays = {n: jnp.asarray(given[n]) for n in DIFF_NAMES if given.get(n) is not None}
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens)
    static = _Static(flags, _host_cu_seqlens(cu_seqlens, cu_seqlens_cpu))
    o, ht = _gdn(static, arrays, cu)
    return o, (ht if flags.output_final_state else None)


def _host_cu_seqlens(cu_seqlens: Any, cu_seqlens_cpu: Any) -> tuple[int, ...] | None:
    src = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens
    if src is None or isinstance(src, _Tracer):
        return None
    return tuple(int(c) for c in np.asarray(src).reshape(-1))


def fused_recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
    *,
    gk: jax.Array | None = None,
    gv: jax.Array | None = None,
    use_gate_in_kernel: bool = False,
    A_log: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens_cpu: Any = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule, one token at a time, on JAX arrays; differentiable (``jax.grad``, ``jax.vjp``).

    Same arguments, defaults and return value as :func:`rawdelta.fused_recurrent_gated_delta_rule`, without
    ``backend`` and ``stream``: GPU arrays run the ``cuda`` backend (zero-copy), CPU arrays the ``numpy``
    backend. Works eagerly and under ``jax.jit``; the flags and ``scale`` must be static Python values.

    Args:
        q (jax.Array): queries ``[B, T, H, K]``, float32/float16/bfloat16 (float64 on CPU with x64).
        k (jax.Array): keys ``[B, T, H, K]``, same dtype as q.
        v (jax.Array): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0``.
        g (jax.Array, optional): log-decay ``[B, T, HV]`` (the raw gate with ``use_gate_in_kernel``).
        beta (jax.Array, optional): ``[B, T, HV]`` or ``[B, T, HV, V]``. Default: ones.
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (jax.Array, optional): ``[N, HV, K, V]``. Default: zeros.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` (float32). Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head. Default: ``False``.
        cu_seqlens (jax.Array, optional): int32/int64 ``[N + 1]`` offsets of packed sequences (B must be 1).
        gk (jax.Array, optional): per-key log-decay ``[B, T, HV, K]``.
        gv (jax.Array, optional): per-value log-decay ``[B, T, HV, V]``.
        use_gate_in_kernel (bool): ``g = -exp(A_log) * softplus(g + dt_bias)``. Default: ``False``.
        A_log (jax.Array, optional): ``[HV]``, with ``use_gate_in_kernel``.
        dt_bias (jax.Array, optional): ``[HV]``, with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        inplace_final_state (bool): JAX arrays are immutable, so this only implies ``output_final_state``: the
            new state is returned (donate ``initial_state`` to ``jax.jit`` to let XLA reuse its buffer).
        cu_seqlens_cpu (array, optional): a host copy of ``cu_seqlens`` (numpy or a sequence of ints); avoids
            a device-to-host copy when ``cu_seqlens`` is traced.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32, or None
        unless ``output_final_state``.

    Gradients flow to every floating input given (q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias)
    from both o and final_state.
    """
    given = {"q": q, "k": k, "v": v, "g": g, "gk": gk, "gv": gv, "beta": beta, "initial_state": initial_state,
             "A_log": A_log, "dt_bias": dt_bias}
    flags = GDNFlags(
        scale=_static_scale(scale),
        output_final_state=bool(output_final_state or inplace_final_state),
        use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
        use_gate_in_kernel=bool(use_gate_in_kernel),
        use_beta_sigmoid_in_kernel=bool(use_beta_sigmoid_in_kernel),
        allow_neg_eigval=bool(allow_neg_eigval),
    )
    return _call(given, cu_seqlens, cu_seqlens_cpu, flags)


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: jax.Array | None = None,
    *,
    chunk_size: int = 64,
    use_gate_in_kernel: bool = False,
    A_log: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    cu_seqlens_cpu: Any = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule computed chunk by chunk (training, prefill) on JAX arrays; differentiable (``jax.grad``,
    ``jax.vjp``).

    Same arguments, defaults and return value as :func:`rawdelta.chunk_gated_delta_rule`, without ``backend``
    and ``stream``: GPU arrays run the ``cuda`` backend (zero-copy), CPU arrays the ``numpy`` backend. Works
    eagerly and under ``jax.jit``; the flags, ``scale`` and ``chunk_size`` must be static Python values.

    Args:
        q (jax.Array): queries ``[B, T, H, K]``, float32/float16/bfloat16 (float64 on CPU with x64).
        k (jax.Array): keys ``[B, T, H, K]``, same dtype as q.
        v (jax.Array): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0``.
        g (jax.Array, optional): log-decay ``[B, T, HV]`` (the raw gate with ``use_gate_in_kernel``).
        beta (jax.Array, optional): ``[B, T, HV]``. Default: ones.
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (jax.Array, optional): ``[N, HV, K, V]``. Default: zeros.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` (float32). Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head. Default: ``False``.
        cu_seqlens (jax.Array, optional): int32/int64 ``[N + 1]`` offsets of packed sequences (B must be 1).
        chunk_size (int): tokens per chunk, 16, 32 or 64; static (with ``jax.jit``, pass it through
            ``static_argnames`` or close over it). Default: 64.
        use_gate_in_kernel (bool): ``g = -exp(A_log) * softplus(g + dt_bias)``. Default: ``False``.
        A_log (jax.Array, optional): ``[HV]``, with ``use_gate_in_kernel``.
        dt_bias (jax.Array, optional): ``[HV]``, with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        cu_seqlens_cpu (array, optional): a host copy of ``cu_seqlens`` (numpy or a sequence of ints); avoids
            a device-to-host copy when ``cu_seqlens`` is traced.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32, or None
        unless ``output_final_state``.

    Gradients flow to every floating input given (q, k, v, g, beta, initial_state, A_log, dt_bias) from both
    o and final_state.
    """
    given = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state, "A_log": A_log,
             "dt_bias": dt_bias}
    flags = GDNFlags(
        scale=_static_scale(scale),
        output_final_state=bool(output_final_state),
        use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
        use_gate_in_kernel=bool(use_gate_in_kernel),
        use_beta_sigmoid_in_kernel=bool(use_beta_sigmoid_in_kernel),
        allow_neg_eigval=bool(allow_neg_eigval),
        mode="chunk",
        chunk_size=_static_chunk_size(chunk_size),
    )
    return _call(given, cu_seqlens, cu_seqlens_cpu, flags)
