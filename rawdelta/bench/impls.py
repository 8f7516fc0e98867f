"""How each implementation runs an op: one builder per implementation kind, none per op.

A builder takes ``(op, mode, workload)`` and returns ``fn``; ``fn()`` makes one call (forward; forward then
backward; or one decode step with the state in and out) and returns the outputs by name. Everything that
is not the call itself (array conversion, leaves for autograd, the stream) happens in the builder, so a
timed call is only the call. Availability functions return None or why the implementation cannot run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..ops.common.backend import numba_status
from ..testing.reference import grad_label
from .modes import DECODE, FORWARD, FORWARD_BACKWARD

if TYPE_CHECKING:
    from .env import Env
    from .registry import OpSpec
    from .workload import Workload

Call = Callable[[], dict[str, Any]]


def _op_kwargs(x: dict[str, Any]) -> dict[str, Any]:
    return {n: a for n, a in x.items() if n != "do"}


def _arrays(x: dict[str, Any]) -> dict[str, Any]:
    """The floating input arrays of a workload's call (every array but the cotangent and the offsets)."""
    return {n: a for n, a in x.items() if n not in ("do", "cu_seqlens") and hasattr(a, "shape")}


# ----------------------------------------------------------------------------------------------------------------------
# rawdelta: the core API (the raw forward/backward pair for gradients) on one backend
# ----------------------------------------------------------------------------------------------------------------------


def rawdelta(backend: str) -> Callable[[OpSpec, str, Workload], Call]:
    """Builder for ``rawdelta.<op>`` on `backend` (numpy arrays for ``numpy``, CuPy views otherwise)."""

    def build(op: OpSpec, mode: str, w: Workload) -> Call:
        import rawdelta as rd

        x = w.arrays("numpy" if backend == "numpy" else "cupy")
        kw = _op_kwargs(x)
        kw["backend"] = backend
        if backend != "numpy":
            kw["stream"] = w.stream()
        f = getattr(rd, op.name)
        if mode == FORWARD:
            def run() -> dict[str, Any]:
                outs = f(**kw)
                return {"o": outs[0] if isinstance(outs, tuple) else outs}
        elif mode == DECODE:
            def run() -> dict[str, Any]:
                o, ht = f(**kw, output_final_state=True)
                return {"o": o, "final_state": ht}
        elif mode == FORWARD_BACKWARD:
            fwd, bwd, do = getattr(rd, op.name + "_fwd"), getattr(rd, op.name + "_bwd"), x["do"]
            diff = tuple(_arrays(x))

            def run() -> dict[str, Any]:
                outs, res = fwd(**kw)
                grads = bwd(res, do)
                return {"o": outs[0] if isinstance(outs, tuple) else outs,
                        **{grad_label(n): getattr(grads, n) for n in diff}}
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return run

    return build


# ----------------------------------------------------------------------------------------------------------------------
# The peer (fla-core) and the yardstick (torch SDPA), through torch
# ----------------------------------------------------------------------------------------------------------------------


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def peer(op: OpSpec, mode: str, w: Workload) -> Call:
    """Builder for the peer's function of `op` (``op.peer``) on torch tensors; gradients by ``torch.autograd.grad``."""
    import torch

    if op.peer is None:
        raise NotImplementedError(f"no peer function for {op.name}")
    f = _import(op.peer)
    x = w.arrays("torch")
    flags = {n: v for n, v in x.items() if not hasattr(v, "shape")}
    arrays = _arrays(x)
    # q, k, v positionally (every peer op takes them first), the other arrays by name
    first, rest = ("q", "k", "v"), {n: a for n, a in arrays.items() if n not in ("q", "k", "v")}

    def out0(outs: Any) -> Any:
        return outs[0] if isinstance(outs, tuple) else outs

    if mode == FORWARD:
        def run() -> dict[str, Any]:
            with torch.no_grad():
                return {"o": out0(f(*(arrays[n] for n in first), **rest, **flags))}
    elif mode == DECODE:
        def run() -> dict[str, Any]:
            with torch.no_grad():
                o, ht = f(*(arrays[n] for n in first), **rest, output_final_state=True, **flags)
            return {"o": o, "final_state": ht}
    elif mode == FORWARD_BACKWARD:
        leaves = {n: a.detach().clone().requires_grad_() for n, a in arrays.items()}
        do = x["do"]

        def run() -> dict[str, Any]:
            o = out0(f(*(leaves[n] for n in first), **{n: leaves[n] for n in rest}, **flags))
            grads = torch.autograd.grad(o, list(leaves.values()), do)
            return {"o": o.detach(), **{grad_label(n): gr for n, gr in zip(leaves, grads)}}
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run


def sdpa(op: OpSpec, mode: str, w: Workload) -> Call:
    """Builder for causal ``torch.nn.functional.scaled_dot_product_attention`` at the op's ``(B, T, H, D)``.

    Inputs are q, k, v ``[B, T, H, D]`` transposed once to torch's ``[B, H, T, D]``; outputs are returned as
    ``[B, T, H, D]`` views. On a GPU the flash backend is forced (an error, not a fallback, if it cannot run).
    """
    import torch
    import torch.nn.functional as F

    x = w.arrays("torch")
    q, k, v, do = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "do"))
    if w.env.gpu:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend() -> Any:
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        import contextlib

        backend = contextlib.nullcontext
    if mode == FORWARD:
        def run() -> dict[str, Any]:
            with torch.no_grad(), backend():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return {"o": o.transpose(1, 2)}
    elif mode == FORWARD_BACKWARD:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def run() -> dict[str, Any]:
            with backend():
                o = F.scaled_dot_product_attention(*leaves, is_causal=True)
                dq, _, _ = torch.autograd.grad(o, leaves, do)
            return {"o": o.detach().transpose(1, 2), "dq": dq.transpose(1, 2)}
    else:
        raise NotImplementedError(f"softmax attention has no {mode} mode here")
    return run


# ----------------------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------------------


def anywhere(env: Env) -> str | None:
    return None


def needs_gpu(env: Env) -> str | None:
    return None if env.gpu else f"no GPU: {env.gpu_reason}"


def numba_on_gpu(env: Env) -> str | None:
    if not env.gpu:
        return f"no GPU ({env.gpu_reason}); the Numba kernels would run in the CUDA simulator, which is not a timing"
    reason, mode = numba_status()
    if reason:
        return reason
    return None if mode == "GPU" else "NUMBA_ENABLE_CUDASIM=1 is set: the simulator is not a timing"


def _torch_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    try:
        import torch  # noqa: F401
    except Exception as e:
        return f"torch does not import: {type(e).__name__}: {e}"
    return None


def torch_here(env: Env) -> str | None:
    reason = _torch_reason()
    if reason is None and env.gpu and not env.torch_cuda:
        reason = "torch does not see the GPU"
    return reason


def fla_on_gpu(env: Env) -> str | None:
    if not env.gpu:
        return f"needs a CUDA GPU (Triton kernels); {env.gpu_reason}"
    reason = torch_here(env)
    if reason:
        return reason
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception as e:
        return f"fla-core is not importable ({type(e).__name__}: {e}); pip install fla-core"
    return None
