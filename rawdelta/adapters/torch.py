"""PyTorch adapter: ``torch.autograd`` over ``torch.library`` custom ops that call the core, for every registered op.

Each op ``X`` (:func:`rawdelta.ops.registry.ops`) gets, from its declaration alone (:func:`_register`)::

    rawdelta.torch.X(...)                     public: the core signature without backend and stream
      -> autograd.Function
           forward  -> rawdelta::X_fwd       (custom op + fake kernel)
           backward -> rawdelta::X_bwd       (custom op + fake kernel)
      inplace_final_state=True -> rawdelta::X_fwd_inplace (ops that take it: mutates initial_state)

The custom ops take the op's array arguments (its arrays, then ``cu_seqlens`` and ``cu_seqlens_cpu``, in
signature order) and its static options (schema types from their declared annotations); ``X_fwd`` also takes
``for_backward``, whether autograd will take its backward (grad mode on and an input that requires grad). It
returns the op's outputs (a final state not asked for as an empty ``[0]`` tensor: custom ops cannot return None)
and a uint8 workspace, which ``X_bwd`` takes back after the cotangents: what the cuda backend's forward keeps for
its backward (the chunked GDN's per-chunk factors; chunked GLA's and each chunk's start state), empty without
``for_backward`` and otherwise.

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
from ..ops import registry
from ..ops.common.opdef import OpDef
from ._common import (
    CU_SEQLENS,
    adapter_function,
    backward,
    check_statics,
    cupy_external_stream,
    forward,
    output_specs,
    tensor_names,
    workspace_nbytes,
)

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


def _check_device(q: Tensor) -> None:
    if q.device.type not in ("cuda", "cpu"):
        raise TypeError(f"rawdelta.torch supports CUDA and CPU tensors, got q on {q.device}")


def _workspace(op: OpDef, tensors: dict[str, Tensor | None], statics: dict[str, Any], for_backward: bool) -> Tensor:
    """The forward's uint8 workspace for the backward (:func:`~rawdelta.adapters._common.workspace_nbytes`); empty
    unless ``for_backward``."""
    q = tensors["q"]
    assert q is not None
    dt = _NUMPY_OF.get(q.dtype)  # other dtypes are refused by the validation
    nbytes = 0  # off the GPU the backends keep nothing (workspace_nbytes: no compute capability)
    if for_backward and q.device.type == "cuda" and dt is not None:
        major, minor = torch.cuda.get_device_capability(q.device)
        shapes = {n: tuple(t.shape) for n, t in tensors.items() if t is not None and n != "cu_seqlens_cpu"}
        nbytes = workspace_nbytes(op, shapes, dt, statics, f"{major}{minor}")
    return torch.empty((nbytes,), dtype=torch.uint8, device=q.device)


def _split(op: OpDef, tensors: dict[str, Tensor | None]) -> tuple[dict[str, Tensor], Any, Any]:
    arrays = {n: t for n, t in tensors.items() if t is not None and n not in CU_SEQLENS}
    return arrays, tensors.get("cu_seqlens"), tensors.get("cu_seqlens_cpu")


def _run_forward(op: OpDef, tensors: dict[str, Tensor | None], statics: dict[str, Any], for_backward: bool = False
                 ) -> tuple[Any, ...]:
    """Returns the outputs (None for a final state not asked for or written in place) and the workspace (empty
    unless ``for_backward``: a backward follows)."""
    arrays, cu, cu_cpu = _split(op, tensors)
    q = arrays["q"]
    _check_device(q)
    cu_host = _to_numpy(cu_cpu)
    ws = _workspace(op, tensors, statics, for_backward)
    inplace = bool(statics.get("inplace_final_state"))
    if q.device.type == "cuda":
        with _on_torch_stream(q.device):
            outs = forward(op, {n: _to_cupy(t) for n, t in arrays.items()}, _to_cupy(cu), cu_host, statics, "cuda",
                           workspace=_to_cupy(ws) if ws.numel() else None, for_backward=for_backward)
            outs = tuple(_to_torch(x) if x is not None else None for x in outs)
    else:
        outs = forward(op, {n: _to_numpy(t) for n, t in arrays.items()}, _to_numpy(cu), cu_host, statics, "numpy")
        outs = tuple(_from_numpy(x) if x is not None else None for x in outs)
    if inplace:
        outs = (outs[0], None)
    return (*outs, ws)


def _run_backward(op: OpDef, tensors: dict[str, Tensor | None], statics: dict[str, Any], do: Tensor | None,
                  dht: Tensor | None, workspace: Tensor | None = None) -> list[Tensor]:
    """The gradients of the present differentiable inputs; ``do`` None (o unused) counts as zeros."""
    arrays, cu, cu_cpu = _split(op, tensors)
    q = arrays["q"]
    _check_device(q)
    if do is None:
        do = _fake_outputs(op, tensors, statics)[0].zero_()
    cu_host = _to_numpy(cu_cpu)
    present = [n for n in op.differentiable if n in arrays]
    if q.device.type == "cuda":
        with _on_torch_stream(q.device):
            ws = _to_cupy(workspace) if workspace is not None and workspace.numel() else None
            grads = backward(op, {n: _to_cupy(t) for n, t in arrays.items()}, _to_cupy(cu), cu_host, statics,
                             "cuda", _to_cupy(do), _to_cupy(dht), ws)
            out = [_to_torch(grads[n]) for n in present]
    else:
        grads = backward(op, {n: _to_numpy(t) for n, t in arrays.items()}, _to_numpy(cu), cu_host, statics, "numpy",
                         _to_numpy(do), _to_numpy(dht))
        out = [_from_numpy(grads[n]) for n in present]
    # states' gradients come back float32; autograd wants each gradient in its input's dtype.
    return [gr if gr.dtype == arrays[n].dtype else gr.to(arrays[n].dtype) for n, gr in zip(present, out)]


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the fake kernels give shapes and dtypes)
# ----------------------------------------------------------------------------------------------------------------------

# Schema types of the static options by their declared annotation.
_SCHEMA_TYPES: dict[str, Any] = {"bool": bool, "int": int, "float | None": float | None, "int | None": int | None,
                                 "float": float}


@dataclass(frozen=True)
class _OpSpec:
    """An op's custom-op argument lists: its tensors and its static options (schema order)."""

    op: OpDef
    tensors: tuple[str, ...]
    statics: tuple[str, ...]  # adapter options taken by the forward op (inplace_final_state has its own op)

    @property
    def n_outputs(self) -> int:
        return len(self.op.outputs)

    @property
    def cotangents(self) -> tuple[str, ...]:
        return ("do", "dht") if self.op.has_state else ("do",)

    @property
    def fwd_args(self) -> tuple[str, ...]:
        # for_backward: whether autograd will take the backward (the forward then keeps more in its workspace)
        return (*self.tensors, *self.statics, "for_backward")

    @property
    def bwd_statics(self) -> tuple[str, ...]:
        return tuple(n for n in self.statics if n != "output_final_state")

    @property
    def bwd_args(self) -> tuple[str, ...]:
        return (*self.cotangents, "workspace", *self.tensors, *self.bwd_statics)

    @property
    def inplace_args(self) -> tuple[str, ...]:
        return (*self.tensors, *self.bwd_statics)

    def annotation(self, name: str) -> Any:
        if name == "workspace" or name in self.op.array_names and self.op.family.array(name).required:
            return Tensor
        if name in self.statics:
            return _SCHEMA_TYPES[self.op.option(name).annotation]
        if name == "for_backward":
            return bool
        return Tensor | None


def _spec(op: OpDef) -> _OpSpec:
    # an older option name is folded into its option before the custom ops (_call), which take the option only
    statics = tuple(o.name for o in op.adapter_options if o.name != "inplace_final_state" and o.alias_of is None)
    unknown = [n for n in statics if op.option(n).annotation not in _SCHEMA_TYPES]
    if unknown:
        raise TypeError(f"{op.name}: static options {unknown} have no torch schema type")
    return _OpSpec(op, tensor_names(op), statics)


def _signature(spec: _OpSpec, names: tuple[str, ...], returns: Any) -> inspect.Signature:
    """The annotated signature ``torch.library`` infers a custom op's schema from."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, annotation=spec.annotation(n)) for n in names]
    return inspect.Signature(params, return_annotation=returns)


def _eager(args: tuple[Any, ...]) -> bool:
    """Whether a call may run a custom op's implementation itself rather than through the dispatcher: nothing traces
    it (``torch.compile``), no functorch transform or dispatch mode is active, and every tensor argument is a plain
    ``torch.Tensor`` (no fake, functional or other subclass). Then the dispatcher would only call that implementation,
    and it and ``autograd.Function``'s argument binding cost host time on every eager call (about 0.15 ms of a no-grad
    call's 0.25 ms of adapter overhead on a CPU); anywhere else the custom ops run as registered. ``is_compiling``
    comes first: Dynamo folds it to True and traces none of the rest."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(type(a) is Tensor for a in args if isinstance(a, Tensor)))


def _impl_or_op(impl: Any, name: str, args: tuple[Any, ...], mutated: Tensor | None = None) -> Any:
    """The custom op ``rawdelta::<name>`` on `args`: its implementation `impl` called directly where the call is eager
    (:func:`_eager`), else the op through the dispatcher. `mutated`: the argument the op writes in place, whose version
    a direct call bumps as the dispatcher would (autograd's check on saved tensors)."""
    if not _eager(args):
        return getattr(torch.ops.rawdelta, name)(*args)
    out = impl(*args)
    if mutated is not None:
        torch.autograd.graph.increment_version(mutated)
    return out


def _named(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # The dispatcher passes schema arguments positionally; accept keywords too (a direct call of the op).
    return {**dict(zip(names, args)), **kwargs}


def _fake_outputs(op: OpDef, a: dict[str, Any], statics: dict[str, Any]) -> list[Tensor]:
    """Empty tensors of the op's output shapes and dtypes for the static options `statics` (a final state not asked
    for as ``[0]``)."""
    present = {n: a[n] for n in op.array_names if a.get(n) is not None}
    cu = a.get("cu_seqlens")
    specs = output_specs(op, {n: tuple(t.shape) for n, t in present.items()},
                         {n: _NUMPY_OF.get(t.dtype, np.dtype(np.float32)) for n, t in present.items()},
                         None if cu is None else cu.shape[0], statics)
    q = present["q"]
    outs = []
    for out, (shape, dt) in zip(op.outputs, specs):
        if out.name == "final_state" and not statics.get("output_final_state"):
            outs.append(q.new_empty((0,), dtype=torch.float32))
        else:
            outs.append(q.new_empty(shape, dtype=_TORCH_OF[dt]))
    return outs


@dataclass(frozen=True)
class _Op:
    """One op's custom ops and the autograd.Function over them."""

    spec: _OpSpec
    fwd: Any  # torch.library CustomOpDef
    bwd: Any
    inplace: Any  # the in-place decode op (None for ops without inplace_final_state)
    function: Any  # torch.autograd.Function subclass
    fwd_impl: Any  # the forward op's implementation, for eager calls (_eager)
    inplace_impl: Any  # the in-place op's implementation (None without the op)


def _register(op: OpDef) -> _Op:
    """Register ``rawdelta::{name}_fwd`` / ``_bwd`` (and ``_fwd_inplace`` where the op takes
    ``inplace_final_state``) with fake kernels, and build the autograd.Function over them.

    ``_bwd`` returns the gradients of the present differentiable inputs in the op's order (absent inputs skipped),
    each with its input's shape and dtype.
    """
    spec = _spec(op)
    # The autograd.Function below closes over plain strings, tuples and ints only: Dynamo cannot wrap a
    # closed-over CustomOpDef or _OpSpec, so it calls the ops through torch.ops by name.
    fwd_args, bwd_args = spec.fwd_args, spec.bwd_args
    tensor_names_, statics_names = spec.tensors, spec.statics
    n_tensors, n_out = len(spec.tensors), spec.n_outputs
    has_state = op.has_state
    floats = op.differentiable
    fwd_name, bwd_name = f"{op.name}_fwd", f"{op.name}_bwd"

    def fwd_impl(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        a = _named(fwd_args, args, kwargs)
        *outs, ws = _run_forward(op, {n: a[n] for n in tensor_names_}, {n: a[n] for n in statics_names},
                                 a["for_backward"])
        if has_state and outs[1] is None:
            outs[1] = torch.empty((0,), dtype=torch.float32, device=outs[0].device)
        return (*outs, ws)

    def fwd_fake(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        a = _named(fwd_args, args, kwargs)
        statics = {n: a[n] for n in statics_names}
        outs = _fake_outputs(op, a, statics)
        return (*outs, _workspace(op, {n: a[n] for n in tensor_names_}, statics, a["for_backward"]))

    def bwd_impl(*args: Any, **kwargs: Any) -> list[Tensor]:
        a = _named(bwd_args, args, kwargs)
        return _run_backward(op, {n: a[n] for n in tensor_names_}, {n: a[n] for n in spec.bwd_statics}, a["do"],
                             a.get("dht"), a["workspace"])

    def bwd_fake(*args: Any, **kwargs: Any) -> list[Tensor]:
        a = _named(bwd_args, args, kwargs)
        return [t.new_empty(t.shape) for n in floats if (t := a[n]) is not None]

    fwd_impl.__signature__ = _signature(spec, fwd_args, tuple[(Tensor,) * (n_out + 1)])  # type: ignore[attr-defined]
    bwd_impl.__signature__ = _signature(spec, bwd_args, list[Tensor])  # type: ignore[attr-defined]
    fwd_op = torch.library.custom_op(f"rawdelta::{fwd_name}", mutates_args=())(fwd_impl)
    bwd_op = torch.library.custom_op(f"rawdelta::{bwd_name}", mutates_args=())(bwd_impl)
    fwd_op.register_fake(fwd_fake)
    bwd_op.register_fake(bwd_fake)
    inplace_op, inplace_impl = _register_inplace(spec) if "inplace_final_state" in op.params else (None, None)
    i_final = statics_names.index("output_final_state") if has_state else -1

    class Function(torch.autograd.Function):
        """Arguments: the op's tensors (or None), then its static options, in custom-op schema order."""

        @staticmethod
        def forward(*args: Any) -> tuple[Tensor, ...]:
            return _impl_or_op(fwd_impl, fwd_name, args)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
            ctx.save_for_backward(output[-1], *inputs[:n_tensors])
            statics = inputs[n_tensors:-1]  # the last input is for_backward
            ctx.output_final_state = bool(statics[i_final]) if has_state else False
            ctx.bwd_statics = tuple(s for i, s in enumerate(statics) if i != i_final)
            # None (not zeros) for an unused o or final state, so an unused final state costs no dht.
            ctx.set_materialize_grads(False)
            # The workspace, and a final state not asked for, take no cotangent (in one call: a second replaces it).
            ctx.mark_non_differentiable(*output[(2 if ctx.output_final_state else 1):])

        @staticmethod
        def backward(ctx: Any, *cts: Any) -> tuple[Tensor | None, ...]:
            ws, *inputs = ctx.saved_tensors
            saved = dict(zip(tensor_names_, inputs))
            n_args = n_tensors + len(statics_names) + 1  # and for_backward
            do = cts[0]
            dht = cts[1] if has_state and ctx.output_final_state else None
            if (do is None and dht is None) or not any(ctx.needs_input_grad):
                return (None,) * n_args
            do = None if do is None else do.contiguous()  # None: zeros, made by the backward op
            cot = (do, dht.contiguous() if dht is not None else None) if has_state else (do,)
            args = (*cot, ws, *inputs, *ctx.bwd_statics)
            grads = _impl_or_op(bwd_impl, bwd_name, args)
            by_name = dict(zip([n for n in floats if saved.get(n) is not None], grads))
            return tuple(by_name.get(n) for n in tensor_names_) + (None,) * (n_args - n_tensors)

    Function.__name__ = Function.__qualname__ = "".join(w.title() for w in op.name.split("_")) + "Function"
    return _Op(spec, fwd_op, bwd_op, inplace_op, Function, fwd_impl, inplace_impl)


def _register_inplace(spec: _OpSpec) -> tuple[Any, Any]:
    """``rawdelta::{name}_fwd_inplace``: the decoding forward, returning o and writing the final state into
    ``initial_state`` (float32, contiguous); returns the op and its implementation."""
    op = spec.op
    names = spec.inplace_args

    def impl(*args: Any, **kwargs: Any) -> Tensor:
        a = _named(names, args, kwargs)
        statics = {n: a[n] for n in spec.bwd_statics}
        o, *_ = _run_forward(op, {n: a[n] for n in spec.tensors},
                             {**statics, "output_final_state": True, "inplace_final_state": True})
        return o

    def fake(*args: Any, **kwargs: Any) -> Tensor:
        a = _named(names, args, kwargs)
        return _fake_outputs(op, a, {n: a[n] for n in spec.bwd_statics})[0]

    impl.__signature__ = _signature(spec, names, Tensor)  # type: ignore[attr-defined]
    inplace = torch.library.custom_op(f"rawdelta::{op.name}_fwd_inplace", mutates_args=("initial_state",))(impl)
    inplace.register_fake(fake)
    return inplace, impl


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def _host_cu_seqlens(cu_seqlens_cpu: Any) -> Tensor | None:
    if cu_seqlens_cpu is not None and not isinstance(cu_seqlens_cpu, Tensor):
        return torch.as_tensor(np.asarray(cu_seqlens_cpu))
    return cu_seqlens_cpu


def _check_tensors(op: OpDef, a: dict[str, Any]) -> None:
    """Every array argument a torch.Tensor (or None) and the op's arrays on one device: TypeError naming them."""
    bad = [f"{n} must be a torch.Tensor, got {type(a[n]).__name__}" for n in op.array_names + ("cu_seqlens",)
           if a.get(n) is not None and not isinstance(a[n], Tensor)]
    if bad:
        raise TypeError("; ".join(bad))
    devices = {n: str(a[n].device) for n in op.array_names if a.get(n) is not None}
    if len(set(devices.values())) > 1:
        raise TypeError(f"all tensors must be on one device, got {devices}")


def _statics(spec: _OpSpec, a: dict[str, Any]) -> tuple[Any, ...]:
    """The static options in schema order, as the schema types (after the core's checks resolved them)."""
    out = []
    for n in spec.statics:
        x = a[n]
        kind = spec.op.option(n).annotation
        if x is not None:
            x = bool(x) if kind == "bool" else (float(x) if kind.startswith("float") else int(x))
        out.append(x)
    return tuple(out)


def _call(entry: _Op, a: dict[str, Any]) -> Any:
    """A public call: validate what the custom ops cannot express, then the autograd.Function (or the in-place
    op)."""
    spec = entry.spec
    op = spec.op
    _check_tensors(op, a)
    resolved = check_statics(op, {o.name: a[o.name] for o in op.adapter_options})
    if "cu_seqlens_cpu" in a:
        a["cu_seqlens_cpu"] = _host_cu_seqlens(a["cu_seqlens_cpu"])
    tensors = tuple(a.get(n) for n in spec.tensors)
    statics = _statics(spec, resolved)
    if a.get("inplace_final_state"):
        if a.get("initial_state") is None:
            raise ValueError("inplace_final_state=True needs initial_state to write into")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            raise ValueError("inplace_final_state=True overwrites initial_state and has no backward; call it under "
                             "torch.no_grad() or with inputs that do not require grad")
        i_final = spec.statics.index("output_final_state")
        args = (*tensors, *(s for i, s in enumerate(statics) if i != i_final))
        o = _impl_or_op(entry.inplace_impl, f"{op.name}_fwd_inplace", args, mutated=a["initial_state"])
        return o, a["initial_state"]
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (*tensors, *statics, for_backward)
    # without autograd's backward the autograd.Function adds nothing but its host time
    eager = not for_backward and _eager(args)
    *outs, _ = entry.fwd_impl(*args) if eager else entry.function.apply(*args)
    if op.has_state:
        return outs[0], (outs[1] if a["output_final_state"] else None)
    return outs[0]


def _public_function(entry: _Op) -> Any:
    op = entry.spec.op
    body = (f"Same arguments, defaults and return value as :func:`rawdelta.{op.name}`, without ``backend`` and "
            "``stream``: CUDA tensors run the ``cuda`` backend on ``torch.cuda.current_stream()`` with every "
            "allocation made by torch's caching allocator; CPU tensors run the ``numpy`` backend. Differentiable "
            "through ``torch.autograd`` (gradients reach every floating input given"
            + (", from both outputs" if op.has_state else "") + "); works under ``torch.compile(fullgraph=True)`` "
            "and CUDA graph capture (capture needs ``cu_seqlens=None``: the varlen bookkeeping copies the offsets "
            "between host and device).")
    return adapter_function(op, "Tensor", "torch tensors", body, _call, entry, {"Tensor": Tensor}, __name__)


_OPS: dict[str, _Op] = {}


def entry_point(op: OpDef) -> Any:
    """``rawdelta.torch``'s function for `op`, its custom ops registered on first use (every registered op has one
    from import; an op declared elsewhere, a test's, gets its own here)."""
    if op.name not in _OPS:
        _OPS[op.name] = _register(op)
    return _public_function(_OPS[op.name])


_PUBLIC = {op.name: entry_point(op) for op in registry.ops()}
globals().update(_PUBLIC)
__all__ = sorted(_PUBLIC)
