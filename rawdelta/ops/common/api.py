"""The public functions of an op, derived from its :class:`~.opdef.OpDef`.

For an op ``X``: ``X(...)``, ``X_fwd(...) -> (outputs, residuals)``, ``X_bwd(residuals, do, dht=None) -> grads``,
its residuals type, its family's gradients NamedTuple and its ``naive_*`` float64 references. The functions are
compiled from source built out of the definition (as :mod:`dataclasses` does), so they have real signatures
(``inspect``, ``help``, keyword errors from Python itself) and pass their arguments on as one dict with no
binding work; their docstrings are assembled from the declared documentation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from ..._arrays import on_stream
from .opdef import KEYWORD_ONLY, Family, OpDef, Reference
from .problem import Problem
from .validation import cast_grads, cast_outputs, check_cotangents, swap_state_layout, validate

# ------------------------------------------------------------------------------------------------------------------
# Running a validated problem
# ------------------------------------------------------------------------------------------------------------------


def backend_stream(p: Problem) -> Any:
    """The caller's stream for the cuda backend; a no-op context for the others."""
    return on_stream(p.stream) if p.backend == "cuda" else contextlib.nullcontext()


def run_forward(p: Problem, workspace: Any = None, for_backward: bool = False) -> tuple[tuple[Any, ...], NamedTuple]:
    """The forward of a validated problem on its backend: ``(outputs, residuals)``, outputs in the contract dtypes
    (the final state None unless asked for, ``initial_state`` itself with ``inplace_final_state``).

    ``workspace``: the framework adapters' buffer of the backend's ``workspace_nbytes`` bytes, in which the forward
    leaves what its backward takes back. ``for_backward``: its backward follows (``Problem.for_backward``), so the
    backend may keep what the backward would otherwise recompute."""
    if for_backward:
        p = p.replace(for_backward=True)
    op = p.op
    with backend_stream(p):
        outs, saved = op.backends[p.backend].function("forward")(p, workspace)
        outs = cast_outputs(p, outs)
    if op.has_state:
        o, ht = outs
        if p.inplace_final_state and ht is not p.inplace_target:
            p.inplace_target[...] = ht
            ht = p.inplace_target
        outs = (o, ht if p.output_final_state else None)
    return outs, residuals_type(op)(p, saved)


def run_backward(p: Problem, saved: Any, do: Any, dht: Any = None) -> dict[str, Any]:
    """The backward of a validated problem: gradients keyed by the family's gradient fields, in their inputs'
    dtypes. ``saved``: what the forward left (None: the backend recomputes it)."""
    if p.inplace_final_state:
        raise ValueError("residuals come from a call with inplace_final_state=True, which overwrote initial_state; "
                         "run the forward without it to take gradients")
    do, dht = check_cotangents(p, do, dht)
    with backend_stream(p):
        grads = p.op.backends[p.backend].function("backward")(p, saved, do, dht)
    return cast_grads(p, grads)


def forward(op: OpDef, args: dict[str, Any], for_backward: bool = False) -> tuple[tuple[Any, ...], NamedTuple]:
    """Validate a call of `op` (arguments by name) and run its forward; ``for_backward``: as :func:`run_forward`'s
    (``X_fwd``)."""
    return run_forward(validate(op, args), for_backward=for_backward)


def backward(residuals: Any, do: Any, dht: Any = None) -> NamedTuple:
    """The gradients NamedTuple of the op that made `residuals`."""
    p, saved = residuals
    return grads_type(p.op.family)(**run_backward(p, saved, do, dht))


def reference_forward(op: OpDef, args: dict[str, Any]) -> tuple[Any, ...]:
    """The op's numpy backend in float64 on host arrays (the ``naive_*`` references): float64 outputs, the final
    state None unless asked for."""
    p = validate(op, {**args, "backend": "numpy"})
    outs, _ = op.backends["numpy"].function("forward")(p, None)
    if op.has_state:
        outs = (outs[0], swap_state_layout(p, outs[1]) if p.output_final_state else None)
    return tuple(outs)


def reference_backward(op: OpDef, args: dict[str, Any], do: Any, dht: Any = None) -> NamedTuple:
    """Float64 gradients from the op's numpy backend (the ``naive_*_bwd`` references), w.r.t. the raw inputs."""
    p = validate(op, {**args, "backend": "numpy", "output_final_state": False})
    do, dht = check_cotangents(p, do, dht)
    grads = op.backends["numpy"].function("backward")(p, None, do, dht)
    out = {}
    for f in grads_type(op.family)._fields:
        gr = grads.get(f) if getattr(p, f) is not None else None
        out[f] = swap_state_layout(p, gr) if op.family.array(f).state else gr
    return grads_type(op.family)(**out)


# ------------------------------------------------------------------------------------------------------------------
# Types
# ------------------------------------------------------------------------------------------------------------------


def camel(name: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in name.split("_"))


@functools.cache
def grads_type(family: Family) -> type:
    """The family's gradients NamedTuple: one field per differentiable array, None where there is no gradient."""
    lines = [family.grads_doc, "", "Attributes:"]
    for a in family.arrays:
        if a.differentiable:
            dt = "float32" if a.state else "its input's dtype"
            lines.append(f"    {a.name}: d{a.name} {a.shape_text()} ({dt}).")
    cls = NamedTuple(family.grads_name, [(a.name, Any) for a in family.arrays if a.differentiable])
    cls.__doc__ = "\n".join(lines)
    cls.__module__ = f"rawdelta.ops.{family.name}"
    return cls


@functools.cache
def residuals_type(op: OpDef) -> type:
    """``X_fwd``'s residuals NamedTuple: ``(problem, saved)``."""
    cls = NamedTuple(f"{camel(op.name)}Residuals", [("problem", Problem), ("saved", Any)])  # noqa: UP014
    cls.__doc__ = (f"What :func:`{op.name}_bwd` needs from :func:`{op.name}_fwd`. {op.residuals_doc}\n\n"
                   "Attributes:\n"
                   "    problem: the validated call (inputs as contiguous arrays, shapes, options, backend, stream).\n"
                   "    saved: what the backend's forward kept for its backward (None: the backward recomputes it).")
    cls.__module__ = f"rawdelta.ops.{op.family.name}"
    return cls


# ------------------------------------------------------------------------------------------------------------------
# Signatures and docstrings
# ------------------------------------------------------------------------------------------------------------------


def signature_source(op: OpDef, names: tuple[str, ...], annotate: Callable[[str], str]) -> str:
    """Python source of a parameter list: `names` (with :data:`KEYWORD_ONLY`) with the op's defaults; arrays
    default to None unless required. ``annotate(name)`` gives each annotation's source."""
    params = []
    for n in names:
        if n == KEYWORD_ONLY:
            params.append("*")
            continue
        arr = next((a for a in op.family.arrays if a.name == n), None)
        if arr is not None:
            default = "" if arr.required else " = None"
        else:
            default = f" = {op.option(n).default!r}"
        params.append(f"{n}: {annotate(n)}{default}")
    return ", ".join(params)


def _arg_doc(op: OpDef, name: str, array_type: str) -> str:
    arr = next((a for a in op.family.arrays if a.name == name), None)
    if arr is not None:
        opt = "" if arr.required else ", optional"
        dtype = " Read as float32." if arr.float32 and not arr.state else ""
        absent = "" if arr.required else f" Default: ``None``{f' ({arr.absent})' if arr.absent else ''}."
        return f"{name} ({array_type}{opt}): {arr.shape_text()}, {arr.doc}.{dtype}{absent}"
    o = op.option(name)
    doc = o.doc
    if name == "chunk_size":
        doc = f"tokens per chunk, one of {op.chunk_sizes}. Default: {o.default!r}."
        if o.default is None:  # the op picks it from the shapes: its own option says how
            doc = f"{o.doc} Default: ``None``."
    kind = o.annotation
    if kind == "Any":
        kind = f"{array_type}, optional" if name.startswith("cu_seqlens") else "optional"
    return f"{name} ({kind}): {doc}"


def _returns_doc(op: OpDef, array_type: str, dtype: str | None = None) -> str:
    parts = []
    for out in op.outputs:
        dt = dtype or (f"in {out.like}'s dtype" if out.like else "float32")
        tail = ", or None unless ``output_final_state``" if out.name == "final_state" else ""
        parts.append(f"{out.name} ``[{', '.join(out.shape)}]`` {dt}{tail}")
    if len(op.outputs) == 1:
        return f"{array_type}: {parts[0]}."
    return f"``({', '.join(o.name for o in op.outputs)})``: " + "; ".join(parts) + "."


def docstring(op: OpDef, summary: str, body: str, names: tuple[str, ...], array_type: str = "array",
              returns: str | None = None, extra_args: tuple[str, ...] = ()) -> str:
    """A Google-style docstring: summary, body, Args for `names` (and `extra_args` lines), Returns."""
    lines = [summary, ""]
    if body:
        lines += [body.strip(), ""]
    lines.append("Args:")
    for n in names:
        if n != KEYWORD_ONLY:
            lines.append(f"    {_arg_doc(op, n, array_type)}")
    lines += [f"    {a}" for a in extra_args]
    lines += ["", "Returns:", f"    {returns if returns is not None else _returns_doc(op, array_type)}"]
    return "\n".join(lines)


def arguments_source(names: tuple[str, ...]) -> str:
    """Python source of a dict of the parameters `names` by name (``{"q": q, ...}``): what a generated function hands
    on. A literal, not ``locals()``, so that torch.compile traces through the function."""
    return "{" + ", ".join(f"{n!r}: {n}" for n in names if n != KEYWORD_ONLY) + "}"


def _core_annotation(op: OpDef, name: str) -> str:
    if any(a.name == name for a in op.family.arrays):
        return "Any"
    return op.option(name).annotation


def compile_function(name: str, params: str, body: str, namespace: dict[str, Any], doc: str, module: str,
                     returns: str = "Any") -> Callable[..., Any]:
    """``def name(params) -> returns: body`` compiled in `namespace`, with its docstring and module."""
    src = f"def {name}({params}) -> {returns}:\n    {body}\n"
    ns = dict(namespace)
    exec(compile(src, f"<rawdelta generated {name}>", "exec"), ns)
    fn = ns[name]
    fn.__doc__ = doc
    fn.__module__ = module
    fn.__qualname__ = name
    return fn


# ------------------------------------------------------------------------------------------------------------------
# The public functions of an op
# ------------------------------------------------------------------------------------------------------------------


def _unpack(op: OpDef) -> str:
    return "outs" if len(op.outputs) > 1 else "outs[0]"


def public_functions(op: OpDef) -> dict[str, Any]:
    """``{X, X_fwd, X_bwd, XResiduals, naive_*...}`` for `op`."""
    module = f"rawdelta.ops.{op.family.name}"
    ns = {"_op": op, "_forward": forward, "_backward": backward, "Any": Any}
    params = signature_source(op, op.signature, lambda n: _core_annotation(op, n))
    names = op.signature
    args = arguments_source(names)
    res_t = residuals_type(op)
    grads_t = grads_type(op.family)
    returns = "tuple[Any, Any | None]" if len(op.outputs) > 1 else "Any"
    fn = compile_function(
        op.name, params, f"outs, _ = _forward(_op, {args})\n    return {_unpack(op)}", ns,
        docstring(op, op.summary, op.doc, names), module, returns)
    fwd = compile_function(
        f"{op.name}_fwd", params, f"outs, res = _forward(_op, {args}, True)\n    return {_unpack(op)}, res", ns,
        docstring(op, f"Forward pass of :func:`{op.name}`, returning ``(outputs, residuals)`` for "
                      f":func:`{op.name}_bwd`.", f"Same arguments as :func:`{op.name}`. {op.residuals_doc}", names,
                  returns=f"``(outputs, residuals)``: the outputs of :func:`{op.name}` and a "
                          f":class:`{res_t.__name__}`."), module)
    cot = "do: Any, dht: Any = None" if op.has_state else "do: Any"
    out0 = op.outputs[0]
    bwd_doc = (f"Backward pass of :func:`{op.name}`: the gradients of every floating input.\n\n"
               f"Args:\n    residuals: the second result of :func:`{op.name}_fwd`.\n"
               f"    do (array): cotangent of {out0.name} ``[{', '.join(out0.shape)}]``.\n")
    if op.has_state:
        st = op.outputs[1]
        bwd_doc += (f"    dht (array, optional): cotangent of the final state ``[{', '.join(st.shape)}]``. "
                    "Default: ``None`` (zeros).\n")
    bwd_doc += (f"\nReturns:\n    :class:`{grads_t.__name__}`: each gradient in its input's dtype (states in float32), "
                "None for inputs that were None or that this op does not take.")
    bwd = compile_function(f"{op.name}_bwd", f"residuals: Any, {cot}",
                           "return _backward(residuals, do" + (", dht)" if op.has_state else ")"), ns, bwd_doc, module)
    out = {op.name: fn, f"{op.name}_fwd": fwd, f"{op.name}_bwd": bwd, res_t.__name__: res_t}
    for ref in op.naive:
        out.update(_reference_functions(op, ref, module))
    return out


def _reference_functions(op: OpDef, ref: Reference, module: str) -> dict[str, Any]:
    ns = {"_op": op, "_ref_fwd": reference_forward, "_ref_bwd": reference_backward, "Any": Any}
    names = ref.signature
    params = signature_source(op, names, lambda n: _core_annotation(op, n))
    body = (f"Runs the numpy backend of :func:`~rawdelta.{op.name}` (the chunked algorithm for a chunked op) in "
            "float64 on host arrays of any float dtype. Note the argument order, which is the peer's reference "
            "function's.")
    fwd = compile_function(
        ref.name, params, f"outs = _ref_fwd(_op, {arguments_source(names)})\n    return {_unpack(op)}", ns,
        docstring(op, ref.doc, body, names, returns=_returns_doc(op, "array", "float64")), module)
    bwd_names = tuple(n for n in names if n != "output_final_state")
    if KEYWORD_ONLY not in bwd_names:
        bwd_names = (*bwd_names, KEYWORD_ONLY)
    i = bwd_names.index(KEYWORD_ONLY) + 1
    cot = ("do", "dht") if op.has_state else ("do",)
    bwd_params = signature_source(op, bwd_names[:i], lambda n: _core_annotation(op, n))
    bwd_params += ", " + ", ".join(("do: Any", "dht: Any = None")[:len(cot)])
    rest = signature_source(op, (KEYWORD_ONLY, *bwd_names[i:]), lambda n: _core_annotation(op, n))[1:]
    if rest.strip(", "):
        bwd_params += rest
    dht = "dht" if op.has_state else "None"
    code = f"return _ref_bwd(_op, {arguments_source(bwd_names)}, do, {dht})"
    grads_name = grads_type(op.family).__name__
    extra = ("do (array): cotangent of o.",) + (("dht (array, optional): cotangent of the final state. "
                                                 "Default: ``None`` (zeros).",) if op.has_state else ())
    bwd = compile_function(
        f"{ref.name}_bwd", bwd_params, code, ns,
        docstring(op, f"Float64 gradients of :func:`{ref.name}` (same argument order), from the numpy backend's "
                      "hand-written backward.", "", bwd_names, extra_args=extra,
                  returns=f":class:`{grads_name}` of float64 arrays w.r.t. the raw inputs; None for inputs that "
                          "were None."), module)
    return {ref.name: fwd, f"{ref.name}_bwd": bwd}


def family_exports(family: Family, ops: tuple[OpDef, ...]) -> dict[str, Any]:
    """Everything a family package exports: each op's functions and types, and the gradients NamedTuple."""
    out: dict[str, Any] = {family.grads_name: grads_type(family)}
    for op in ops:
        out.update(public_functions(op))
    return out


__all__ = ["backend_stream", "backward", "family_exports", "forward", "grads_type", "public_functions",
           "reference_backward", "reference_forward", "residuals_type", "run_backward", "run_forward"]
