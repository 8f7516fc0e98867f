"""PyTorch adapter: ``torch.autograd`` over ``torch.library`` custom ops that call the core raw pairs.

Layout (one registration function, :func:`_register`, makes each op's pair of custom ops and its
``autograd.Function``; the glue underneath takes the mode)::

    fused_recurrent_gated_delta_rule(...)              public, same signature as the core op
      -> autograd.Function
           forward  -> rawdelta::fused_recurrent_gated_delta_rule_fwd   (custom op + fake)
           backward -> rawdelta::fused_recurrent_gated_delta_rule_bwd   (custom op + fake)
      inplace_final_state=True -> rawdelta::fused_recurrent_gated_delta_rule_fwd_inplace (mutates initial_state)
    chunk_gated_delta_rule(...)                        public, same signature as the core op
      -> autograd.Function
           forward  -> rawdelta::chunk_gated_delta_rule_fwd             (custom op + fake; ends in chunk_size)
           backward -> rawdelta::chunk_gated_delta_rule_bwd             (custom op + fake; ends in chunk_size)

Every ``_fwd`` op also returns a uint8 workspace that its ``_bwd`` op takes back: the chunked op's per-chunk
factors on CUDA (so the backward does not recompute them), empty otherwise.

The custom ops are opaque to ``torch.compile`` (their fake kernels give shapes and dtypes only), so
``torch.compile(fullgraph=True)`` traces through them. On CUDA tensors they run the ``cuda`` backend
zero-copy (contiguous tensors wrapped by pointer, others through DLPack) on ``torch.cuda.current_stream()``,
with every CuPy allocation served by torch's caching allocator (so CUDA graph capture works and torch accounts
for all memory). On CPU tensors they run the ``numpy`` backend on ``tensor.numpy()`` views.

This module must not use ``from __future__ import annotations``: ``torch.library.custom_op`` reads
the schema from the runtime annotations (the generated ops carry an :class:`inspect.Signature`).
"""

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._arrays import BFLOAT16
from ._common import GDNFlags, backward, cupy_external_stream, diff_names, forward, workspace_nbytes

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]

_OP_FWD_INPLACE = "rawdelta::fused_recurrent_gated_delta_rule_fwd_inplace"
# The boolean options every op takes, in custom-op argument order (after scale and output_final_state).
_FLAG_ARGS = ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval")


# ----------------------------------------------------------------------------------------------------------------------
# Array conversion and the CUDA execution context
# ----------------------------------------------------------------------------------------------------------------------


def _torch_malloc(dev: int, nbytes: int) -> Any:
    """CuPy allocator (bound to device `dev`) backed by torch's caching allocator on the current torch stream."""
    import cupy

    buf = torch.empty((nbytes,), dtype=torch.uint8, device=dev)
    # The UnownedMemory holds `buf`, so the block returns to torch's cache when CuPy drops the pointer.
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buf.data_ptr(), nbytes, buf, dev), 0)


@contextlib.contextmanager
def _on_torch_stream(device: torch.device) -> Iterator[None]:
    """Make torch's current stream CuPy's current stream and route CuPy allocations through torch.

    Entered before any DLPack conversion: with producer and consumer on the same stream, neither
    side inserts a cross-stream wait.
    """
    import cupy

    idx = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(idx):
        stream = torch.cuda.current_stream(idx)
        with (
            cupy.cuda.Device(idx),
            cupy_external_stream(stream.cuda_stream, idx),
            cupy.cuda.using_allocator(functools.partial(_torch_malloc, idx)),
        ):
            yield


# Dtypes the CUDA conversions below map directly (others go through DLPack).
_NUMPY_OF = {torch.float64: np.dtype(np.float64), torch.float32: np.dtype(np.float32),
             torch.float16: np.dtype(np.float16), torch.bfloat16: BFLOAT16, torch.int64: np.dtype(np.int64),
             torch.int32: np.dtype(np.int32), torch.uint8: np.dtype(np.uint8)}
_TORCH_OF = {v: k for k, v in _NUMPY_OF.items()}


def _to_cupy(t: Tensor | None) -> Any:
    """Zero-copy CuPy view of a CUDA tensor, called on the tensor's stream (inside :func:`_on_torch_stream`).

    A contiguous tensor is wrapped by its pointer (the view holds the tensor): DLPack's export and stream
    handshake cost tens of microseconds per array, a third of the adapter's host time per call.
    """
    if t is None:
        return None
    import cupy

    t = t.detach()
    dt = _NUMPY_OF.get(t.dtype)
    if dt is None or not t.is_contiguous() or t.numel() == 0:
        return cupy.from_dlpack(t)
    nbytes = t.numel() * dt.itemsize
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), nbytes, t, t.device.index)
    return cupy.ndarray(tuple(t.shape), dt, cupy.cuda.MemoryPointer(mem, 0))


def _to_torch(a: Any) -> Tensor:
    """Zero-copy tensor over a CuPy result: a view of the torch buffer :func:`_torch_malloc` gave it, else DLPack."""
    owner = getattr(a.data.mem, "_owner", None)
    dt = _TORCH_OF.get(a.dtype)
    if (dt is None or not a.flags.c_contiguous or not isinstance(owner, Tensor) or owner.dtype != torch.uint8
            or owner.dim() != 1):
        return torch.from_dlpack(a)
    start = a.data.ptr - owner.data_ptr()
    return owner[start:start + a.nbytes].view(dt).view(a.shape)


def _to_numpy(t: Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16; reinterpret the bits as ml_dtypes.bfloat16 (zero-copy).
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def _from_numpy(a: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _flags(args: dict[str, Any], output_final_state: bool, mode: str = "recurrent") -> GDNFlags:
    """GDNFlags from a custom op's arguments by name (``scale``, the flags and, for the chunked op, ``chunk_size``)."""
    scale = args["scale"]
    return GDNFlags(
        scale=None if scale is None else float(scale),
        output_final_state=bool(output_final_state),
        **{f: bool(args[f]) for f in _FLAG_ARGS},
        mode=mode,
        chunk_size=int(args["chunk_size"]) if mode == "chunk" else None,
    )


def _check_device(q: Tensor) -> None:
    if q.device.type not in ("cuda", "cpu"):
        raise TypeError(f"rawdelta.torch supports CUDA and CPU tensors, got q on {q.device}")


def _workspace(flags: GDNFlags, q: Tensor, v: Tensor) -> Tensor:
    """The forward's uint8 workspace for the backward (:func:`~rawdelta.adapters._common.workspace_nbytes`)."""
    cc = None
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        cc = f"{major}{minor}"
    dt = _NUMPY_OF.get(q.dtype)  # other dtypes are refused by the validation
    nbytes = 0 if dt is None else workspace_nbytes(flags, tuple(q.shape), tuple(v.shape), dt, cc)
    return torch.empty((nbytes,), dtype=torch.uint8, device=q.device)


def _run_forward(
    tensors: dict[str, Tensor | None],
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None,
    flags: GDNFlags,
    inplace_final_state: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Returns ``(o, final state or None, workspace)``."""
    q, v = tensors["q"], tensors["v"]
    assert q is not None and v is not None
    _check_device(q)
    cu_host = _to_numpy(cu_seqlens_cpu)
    ws = _workspace(flags, q, v)
    if q.device.type == "cuda":
        with _on_torch_stream(q.device):
            arrays = {n: _to_cupy(t) for n, t in tensors.items() if t is not None}
            o, ht = forward(arrays, _to_cupy(cu_seqlens), cu_host, flags, "cuda",
                            inplace_final_state=inplace_final_state, workspace=_to_cupy(ws) if ws.numel() else None)
            o_t = _to_torch(o)
            ht_t = None if ht is None or inplace_final_state else _to_torch(ht)
        return o_t, ht_t, ws
    arrays = {n: _to_numpy(t) for n, t in tensors.items() if t is not None}
    o, ht = forward(arrays, _to_numpy(cu_seqlens), cu_host, flags, "numpy", inplace_final_state=inplace_final_state)
    return _from_numpy(o), (None if ht is None or inplace_final_state else _from_numpy(ht)), ws


def _run_backward(
    tensors: dict[str, Tensor | None],
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None,
    flags: GDNFlags,
    do: Tensor,
    dht: Tensor | None,
    workspace: Tensor | None = None,
) -> list[Tensor]:
    q = tensors["q"]
    assert q is not None
    _check_device(q)
    cu_host = _to_numpy(cu_seqlens_cpu)
    present = [n for n in flags.diff_names if tensors.get(n) is not None]
    if q.device.type == "cuda":
        with _on_torch_stream(q.device):
            arrays = {n: _to_cupy(tensors[n]) for n in present}
            ws = _to_cupy(workspace) if workspace is not None and workspace.numel() else None
            grads = backward(arrays, _to_cupy(cu_seqlens), cu_host, flags, "cuda", _to_cupy(do), _to_cupy(dht), ws)
            out = [_to_torch(grads[n]) for n in present]
    else:
        arrays = {n: _to_numpy(tensors[n]) for n in present}
        grads = backward(arrays, _to_numpy(cu_seqlens), cu_host, flags, "numpy", _to_numpy(do), _to_numpy(dht))
        out = [_from_numpy(grads[n]) for n in present]
    # dh0 comes back float32; autograd wants each gradient in its input's dtype.
    return [gr if gr.dtype == tensors[n].dtype else gr.to(tensors[n].dtype) for n, gr in zip(present, out)]


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the fake kernels give shapes and dtypes)
# ----------------------------------------------------------------------------------------------------------------------


def _state_dtype(v: Tensor) -> torch.dtype:
    # Mirrors final_state_dtype: float64 only for float64 inputs (numpy backend).
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _final_state_shape(q: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> tuple[Any, ...]:
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (N, v.shape[2], q.shape[3], v.shape[3])


@dataclass(frozen=True)
class _OpSpec:
    """What differs between the ops: the name, the glue's mode, the tensor arguments, the trailing statics."""

    name: str  # the core op's; the custom ops are rawdelta::{name}_fwd and rawdelta::{name}_bwd
    mode: str  # "recurrent" or "chunk" (see _common.GDNFlags)
    tensors: tuple[str, ...]  # tensor arguments of both custom ops, in schema order
    extra: tuple[str, ...] = ()  # static arguments after the flags (the chunked op's chunk_size)

    @property
    def fwd_args(self) -> tuple[str, ...]:
        return (*self.tensors, "scale", "output_final_state", *_FLAG_ARGS, *self.extra)

    @property
    def bwd_args(self) -> tuple[str, ...]:
        return ("do", "dht", "workspace", *self.tensors, "scale", *_FLAG_ARGS, *self.extra)


_RECURRENT = _OpSpec("fused_recurrent_gated_delta_rule", "recurrent",
                     ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "cu_seqlens_cpu", "gk", "gv",
                      "A_log", "dt_bias"))
_CHUNK = _OpSpec("chunk_gated_delta_rule", "chunk",
                 ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "cu_seqlens_cpu", "A_log", "dt_bias"),
                 ("chunk_size",))

# Schema types by argument name; every other argument is an optional tensor.
_ANNOTATIONS: dict[str, Any] = {"q": Tensor, "k": Tensor, "v": Tensor, "do": Tensor, "workspace": Tensor,
                                "scale": float | None,
                                "output_final_state": bool, "chunk_size": int, **dict.fromkeys(_FLAG_ARGS, bool)}


def _signature(names: tuple[str, ...], returns: Any) -> inspect.Signature:
    """The annotated signature ``torch.library`` infers a custom op's schema from."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, annotation=_ANNOTATIONS.get(n, Tensor | None)) for n in names]
    return inspect.Signature(params, return_annotation=returns)


def _named(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # The dispatcher passes schema arguments positionally; accept keywords too (a direct call of the op).
    return {**dict(zip(names, args)), **kwargs}


@dataclass(frozen=True)
class _Op:
    """One op's custom ops and the autograd.Function over them."""

    spec: _OpSpec
    fwd: Any  # torch.library CustomOpDef
    bwd: Any
    function: Any  # torch.autograd.Function subclass

    def apply(self, given: dict[str, Any], scale: Any, output_final_state: bool, flags: tuple[bool, ...],
              extra: tuple[Any, ...] = ()) -> tuple[Tensor, Tensor | None]:
        """The public call: the op's tensors (by name, absent = None), scale, output_final_state, flags, extras."""
        o, ht, _ = self.function.apply(*(given.get(n) for n in self.spec.tensors), scale, bool(output_final_state),
                                       *(bool(f) for f in flags), *extra)
        return o, (ht if output_final_state else None)


def _register(spec: _OpSpec) -> _Op:
    """Register ``rawdelta::{name}_fwd`` / ``_bwd`` (with fake kernels) for `spec` and build its autograd.Function.

    ``_fwd`` returns ``(o [B, T, HV, V], final_state [N, HV, K, V], workspace [nbytes] uint8)``, final_state an
    empty ``[0]`` tensor when not requested (custom ops cannot return None); ``_bwd`` takes the workspace back
    after ``do`` and ``dht``. ``_bwd`` returns the gradients of the present floating
    inputs in :data:`~rawdelta.adapters._common.DIFF_NAMES` order (absent inputs skipped), each with its
    input's shape and dtype.
    """
    # The autograd.Function below closes over plain strings, tuples and ints only: Dynamo cannot wrap a
    # closed-over CustomOpDef or _OpSpec, so it calls the ops through torch.ops by name.
    fwd_args, bwd_args = spec.fwd_args, spec.bwd_args
    floats = diff_names(spec.mode)
    tensor_names = spec.tensors
    n_tensors = len(tensor_names)
    fwd_name, bwd_name = f"{spec.name}_fwd", f"{spec.name}_bwd"

    def fwd_impl(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        a = _named(fwd_args, args, kwargs)
        flags = _flags(a, a["output_final_state"], spec.mode)
        o, ht, ws = _run_forward({n: a[n] for n in floats}, a["cu_seqlens"], a["cu_seqlens_cpu"], flags)
        if ht is None:
            ht = torch.empty((0,), dtype=torch.float32, device=o.device)
        return o, ht, ws

    def fwd_fake(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        a = _named(fwd_args, args, kwargs)
        q, v = a["q"], a["v"]
        if a["output_final_state"]:
            ht = v.new_empty(_final_state_shape(q, v, a["cu_seqlens"]), dtype=_state_dtype(v))
        else:
            ht = v.new_empty((0,), dtype=torch.float32)
        return v.new_empty(v.shape), ht, _workspace(_flags(a, a["output_final_state"], spec.mode), q, v)

    def bwd_impl(*args: Any, **kwargs: Any) -> list[Tensor]:
        a = _named(bwd_args, args, kwargs)
        flags = _flags(a, False, spec.mode)
        return _run_backward({n: a[n] for n in floats}, a["cu_seqlens"], a["cu_seqlens_cpu"], flags, a["do"],
                             a["dht"], a["workspace"])

    def bwd_fake(*args: Any, **kwargs: Any) -> list[Tensor]:
        a = _named(bwd_args, args, kwargs)
        return [t.new_empty(t.shape) for n in floats if (t := a[n]) is not None]

    fwd_impl.__signature__ = _signature(fwd_args, tuple[Tensor, Tensor, Tensor])  # type: ignore[attr-defined]
    bwd_impl.__signature__ = _signature(bwd_args, list[Tensor])  # type: ignore[attr-defined]
    fwd_op = torch.library.custom_op(f"rawdelta::{fwd_name}", mutates_args=())(fwd_impl)
    bwd_op = torch.library.custom_op(f"rawdelta::{bwd_name}", mutates_args=())(bwd_impl)
    fwd_op.register_fake(fwd_fake)
    bwd_op.register_fake(bwd_fake)

    class Function(torch.autograd.Function):
        """Arguments: ``spec.tensors`` (or None), then scale, output_final_state, the 4 flags and ``spec.extra``."""

        @staticmethod
        def forward(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
            return getattr(torch.ops.rawdelta, fwd_name)(*args)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
            ctx.save_for_backward(output[2], *inputs[:n_tensors])
            # statics: the flags and extras, which the backward op takes after scale.
            ctx.scale, ctx.output_final_state, *ctx.statics = inputs[n_tensors:]
            # None (not zeros) for an unused o or final state, so an unused final state costs no dht.
            ctx.set_materialize_grads(False)
            # The workspace, and a final state not asked for, take no cotangent (in one call: a second replaces it).
            ctx.mark_non_differentiable(*output[2 if ctx.output_final_state else 1:])

        @staticmethod
        def backward(ctx: Any, do: Tensor | None, dht: Tensor | None, _dws: Any = None) -> tuple[Tensor | None, ...]:
            ws, *inputs = ctx.saved_tensors
            saved = dict(zip(tensor_names, inputs))
            n_args = n_tensors + 2 + len(ctx.statics)
            if (do is None and dht is None) or not any(ctx.needs_input_grad):
                return (None,) * n_args
            v = saved["v"]
            do = torch.zeros(v.shape, dtype=v.dtype, device=v.device) if do is None else do.contiguous()
            dht = dht.contiguous() if dht is not None and ctx.output_final_state else None
            grads = getattr(torch.ops.rawdelta, bwd_name)(do, dht, ws, *inputs, ctx.scale, *ctx.statics)
            by_name = dict(zip([n for n in floats if saved[n] is not None], grads))
            return tuple(by_name.get(n) for n in tensor_names) + (None,) * (n_args - n_tensors)

    Function.__name__ = Function.__qualname__ = "".join(w.title() for w in spec.name.split("_")) + "Function"
    return _Op(spec, fwd_op, bwd_op, Function)


_RECURRENT_OP = _register(_RECURRENT)
_CHUNK_OP = _register(_CHUNK)


@torch.library.custom_op(_OP_FWD_INPLACE, mutates_args=("initial_state",))
def _fwd_inplace_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    initial_state: Tensor,
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None,
    gk: Tensor | None,
    gv: Tensor | None,
    A_log: Tensor | None,
    dt_bias: Tensor | None,
    scale: float | None,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
) -> Tensor:
    """Decoding forward (recurrent op only): returns o and writes the final state into ``initial_state``
    (float32, contiguous)."""
    a = locals()
    o, _, _ = _run_forward({n: a[n] for n in diff_names("recurrent")}, cu_seqlens, cu_seqlens_cpu,
                           _flags(a, True), inplace_final_state=True)
    return o


@_fwd_inplace_op.register_fake
def _fwd_inplace_fake(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, gk, gv, A_log, dt_bias, scale,
                      use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    return v.new_empty(v.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def _host_cu_seqlens(cu_seqlens_cpu: Any) -> Tensor | None:
    if cu_seqlens_cpu is not None and not isinstance(cu_seqlens_cpu, Tensor):
        return torch.as_tensor(np.asarray(cu_seqlens_cpu))
    return cu_seqlens_cpu


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens_cpu: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule, one token at a time, on torch tensors; differentiable through ``torch.autograd``.

    Same arguments, defaults and return value as :func:`rawdelta.fused_recurrent_gated_delta_rule`, without
    ``backend`` and ``stream``: CUDA tensors run the ``cuda`` backend on ``torch.cuda.current_stream()``
    with every allocation made by torch's caching allocator; CPU tensors run the ``numpy`` backend.
    Works under ``torch.compile(fullgraph=True)`` and CUDA graph capture; capture needs ``cu_seqlens=None``,
    because the varlen bookkeeping copies the offsets between host and device (``cu_seqlens_cpu`` saves the
    device-to-host copy, not the upload).

    Args:
        q (Tensor): queries ``[B, T, H, K]``, float32/float16/bfloat16 (float64 on CPU).
        k (Tensor): keys ``[B, T, H, K]``, same dtype as q.
        v (Tensor): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0``.
        g (Tensor, optional): log-decay ``[B, T, HV]`` (the raw gate with ``use_gate_in_kernel``).
        beta (Tensor, optional): ``[B, T, HV]`` or ``[B, T, HV, V]``. Default: ones.
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (Tensor, optional): ``[N, HV, K, V]``. Default: zeros.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` (float32). Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head. Default: ``False``.
        cu_seqlens (Tensor, optional): int32/int64 ``[N + 1]`` offsets of packed sequences (B must be 1).
        gk (Tensor, optional): per-key log-decay ``[B, T, HV, K]``.
        gv (Tensor, optional): per-value log-decay ``[B, T, HV, V]``.
        use_gate_in_kernel (bool): ``g = -exp(A_log) * softplus(g + dt_bias)``. Default: ``False``.
        A_log (Tensor, optional): ``[HV]``, with ``use_gate_in_kernel``.
        dt_bias (Tensor, optional): ``[HV]``, with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        inplace_final_state (bool): write the final state into ``initial_state`` (float32, contiguous) and
            return it as the second output (decoding). Not differentiable. Default: ``False``.
        cu_seqlens_cpu (Tensor, optional): a CPU copy of ``cu_seqlens``, which saves a device-to-host copy.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32, or None
        unless ``output_final_state`` (or ``inplace_final_state``, which returns ``initial_state`` itself).

    Gradients flow to every floating input given (q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias)
    from both o and final_state.
    """
    cu_seqlens_cpu = _host_cu_seqlens(cu_seqlens_cpu)
    if inplace_final_state:
        if initial_state is None:
            raise ValueError("inplace_final_state=True needs initial_state [N, HV, K, V] to write into")
        floats = (q, k, v, g, gk, gv, beta, initial_state, A_log, dt_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in floats):
            raise ValueError("inplace_final_state=True overwrites initial_state and has no backward; call it under "
                             "torch.no_grad() or with inputs that do not require grad")
        o = _fwd_inplace_op(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, gk, gv, A_log, dt_bias,
                            scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                            allow_neg_eigval)
        return o, initial_state
    given = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state, "cu_seqlens": cu_seqlens,
             "cu_seqlens_cpu": cu_seqlens_cpu, "gk": gk, "gv": gv, "A_log": A_log, "dt_bias": dt_bias}
    return _RECURRENT_OP.apply(given, scale, output_final_state, (use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                                                  use_beta_sigmoid_in_kernel, allow_neg_eigval))


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    chunk_size: int = 64,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    cu_seqlens_cpu: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule computed chunk by chunk (training, prefill) on torch tensors; differentiable through
    ``torch.autograd``.

    Same arguments, defaults and return value as :func:`rawdelta.chunk_gated_delta_rule`, without ``backend``
    and ``stream``: CUDA tensors run the ``cuda`` backend on ``torch.cuda.current_stream()`` with every
    allocation made by torch's caching allocator; CPU tensors run the ``numpy`` backend. Works under
    ``torch.compile(fullgraph=True)`` and CUDA graph capture (capture needs ``cu_seqlens=None``, as for
    :func:`fused_recurrent_gated_delta_rule`).

    Args:
        q (Tensor): queries ``[B, T, H, K]``, float32/float16/bfloat16 (float64 on CPU).
        k (Tensor): keys ``[B, T, H, K]``, same dtype as q.
        v (Tensor): values ``[B, T, HV, V]``, same dtype as q; ``HV % H == 0``.
        g (Tensor, optional): log-decay ``[B, T, HV]`` (the raw gate with ``use_gate_in_kernel``).
        beta (Tensor, optional): ``[B, T, HV]``. Default: ones.
        scale (float, optional): query scale. Default: ``K ** -0.5``.
        initial_state (Tensor, optional): ``[N, HV, K, V]``. Default: zeros.
        output_final_state (bool): return the final state ``[N, HV, K, V]`` (float32). Default: ``False``.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k per head. Default: ``False``.
        cu_seqlens (Tensor, optional): int32/int64 ``[N + 1]`` offsets of packed sequences (B must be 1).
        chunk_size (int): tokens per chunk, 16, 32 or 64 (a Python int). Default: 64.
        use_gate_in_kernel (bool): ``g = -exp(A_log) * softplus(g + dt_bias)``. Default: ``False``.
        A_log (Tensor, optional): ``[HV]``, with ``use_gate_in_kernel``.
        dt_bias (Tensor, optional): ``[HV]``, with ``use_gate_in_kernel``.
        use_beta_sigmoid_in_kernel (bool): beta holds logits. Default: ``False``.
        allow_neg_eigval (bool): with the sigmoid, ``beta = 2 * sigmoid(beta)``. Default: ``False``.
        cu_seqlens_cpu (Tensor, optional): a CPU copy of ``cu_seqlens``, which saves a device-to-host copy.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state ``[N, HV, K, V]`` float32, or None
        unless ``output_final_state``.

    Gradients flow to every floating input given (q, k, v, g, beta, initial_state, A_log, dt_bias) from both
    o and final_state.
    """
    given = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state, "cu_seqlens": cu_seqlens,
             "cu_seqlens_cpu": _host_cu_seqlens(cu_seqlens_cpu), "A_log": A_log, "dt_bias": dt_bias}
    return _CHUNK_OP.apply(given, scale, output_final_state, (use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                                              use_beta_sigmoid_in_kernel, allow_neg_eigval),
                           (chunk_size,))
