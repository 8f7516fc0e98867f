"""Accuracy against the float64 reference: rawdelta and the peer on the same inputs, every output and gradient.

For each shape ``(B, T, H, D)`` (K = V = D), the op's input generator draws one set of inputs in the chosen dtype
(gates, the initial state and the cotangents ``do`` and ``dht`` in float32). Each implementation runs forward with
the initial state and the final state out, then backward from ``do`` and ``dht``: rawdelta through its raw
``<op>_fwd`` / ``<op>_bwd`` pair on the chosen backend (CuPy arrays for ``cuda`` and ``numba``), the peer (the op's
``peer`` function in its declaration, through torch autograd). The float64 reference runs on the corner slice the
benchmarks gate on (the first and last sequences times the first and last heads; every op is independent per
sequence and head), and the same slice of each implementation's results is compared: relative RMS error and max-abs
error of ``o``, the final state and the gradient of every input the implementation returns.

Usage (on the GPU machine, with ``fla-core`` importable for the peer)::

    PYTHONPATH=. python3 benchmarks/accuracy.py --op chunk_gla --shapes 8x2048x16x128,2x8192x16x128 [--json out]

``--impl numpy`` (float64) runs without a GPU, at small shapes, as a check of the script.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

import rawdelta
from rawdelta._arrays import BFLOAT16
from rawdelta.ops import registry
from rawdelta.ops.common.opdef import OpDef
from rawdelta.testing import to_host
from rawdelta.testing.compare import error_stats
from rawdelta.testing.inputs import split_op_args
from rawdelta.testing.reference import grad_label, reference_results


def corner(x: np.ndarray, batch_axis: int, head_axis: int) -> np.ndarray:
    """The first and last entries along the batch and head axes."""
    b, h = x.shape[batch_axis], x.shape[head_axis]
    x = np.take(x, sorted({0, b - 1}), axis=batch_axis)
    return np.take(x, sorted({0, h - 1}), axis=head_axis)


def sliced(op: OpDef, name: str, x: np.ndarray) -> np.ndarray:
    """`x` (an input, output or gradient of `op` by name) on the corner slice: states are [N, H, ...], the rest
    [B, T, H, ...]."""
    arr = op.family.array(name) if name in op.takes else None
    state = (arr is not None and arr.state) or name in ("final_state", "initial_state")
    return corner(np.asarray(x), 0, 1 if state else 2)


def draw(op: OpDef, shape: tuple[int, int, int, int], dtype: str, seed: int
         ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    B, T, H, D = shape
    kw, do, dht = split_op_args(op.family.input_generator()(B=B, T=T, H=H, K=D, V=D, dtype=dtype, seed=seed))
    kw = {n: x for n, x in kw.items() if n in op.takes and n != "cu_seqlens"}
    return kw, do, dht


def run_rawdelta(op: OpDef, backend: str, kw: dict[str, Any], do: Any, dht: Any) -> dict[str, Any]:
    if backend != "numpy":
        import cupy

        kw = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
        do, dht = cupy.asarray(do), cupy.asarray(dht)
    else:
        kw = {n: x.astype(np.float64) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
        do, dht = do.astype(np.float64), dht.astype(np.float64)
    (o, ht), res = getattr(rawdelta, f"{op.name}_fwd")(**kw, output_final_state=True, backend=backend)
    grads = getattr(rawdelta, f"{op.name}_bwd")(res, do, dht)
    out = {"o": o, "final_state": ht}
    out.update({grad_label(n): getattr(grads, n) for n in grads._fields if getattr(grads, n) is not None})
    return {n: to_host(x) for n, x in out.items()}


def run_peer(op: OpDef, kw: dict[str, Any], do: np.ndarray, dht: np.ndarray) -> dict[str, Any]:
    import importlib

    import torch

    module, fname = op.bench.peer.split(":")
    f = getattr(importlib.import_module(module), fname)
    dev = "cuda"

    def tensor(x: np.ndarray) -> Any:
        if x.dtype == BFLOAT16:
            return torch.from_numpy(x.view(np.uint16).astype(np.int16)).view(torch.bfloat16).to(dev)
        return torch.from_numpy(np.ascontiguousarray(x)).to(dev)

    arrays = {n: tensor(x) for n, x in kw.items() if isinstance(x, np.ndarray)}
    flags = {n: x for n, x in kw.items() if not isinstance(x, np.ndarray)}
    leaves = {n: a.detach().clone().requires_grad_() for n, a in arrays.items()}
    first = ("q", "k", "v")
    o, ht = f(*(leaves[n] for n in first), **{n: a for n, a in leaves.items() if n not in first}, **flags,
              output_final_state=True)
    grads = torch.autograd.grad((o, ht), list(leaves.values()), (tensor(do).to(o.dtype), tensor(dht)),
                                allow_unused=True)
    out = {"o": o.detach(), "final_state": ht.detach()}
    out.update({grad_label(n): g for n, g in zip(leaves, grads) if g is not None})
    return {n: x.float().cpu().numpy() for n, x in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", required=True)
    ap.add_argument("--shapes", required=True, help="comma-separated BxTxHxD")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impl", action="append", help="cuda, numba, numpy or fla (default: cuda and fla)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    op = registry.op(args.op)
    impls = args.impl or ["cuda", "fla"]
    inputs = {grad_label(n): n for n in op.takes}  # a gradient's label -> its input's name
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.lower().split("x"))
        kw, do, dht = draw(op, shape, args.dtype, args.seed)
        host = {n: sliced(op, n, x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
        ref_out, ref_grads = reference_results(op, {n: x.astype(np.float64) if isinstance(x, np.ndarray) else x
                                                    for n, x in host.items()},
                                               sliced(op, "o", do), sliced(op, "final_state", dht))
        ref = {**ref_out, **{grad_label(n): g for n, g in ref_grads.items() if g is not None}}
        for impl in impls:
            try:
                got = run_peer(op, kw, do, dht) if impl == "fla" else run_rawdelta(op, impl, kw, do, dht)
            except Exception as e:  # noqa: BLE001 - a refusal is a result
                rows.append({"shape": shape, "impl": impl, "error": f"{type(e).__name__}: {e}"[:200]})
                print(f"{shape} {impl}: {rows[-1]['error']}", flush=True)
                continue
            for name, r in ref.items():
                if name not in got:
                    continue
                rel, mx, _ = error_stats(r, sliced(op, inputs.get(name, name), got[name]))
                rows.append({"shape": shape, "impl": impl, "output": name, "rel_rms": rel, "max_abs": mx})
                print(f"{shape} {impl:5s} {name:14s} rel-RMS {rel:.3e}  max-abs {mx:.3e}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"op": op.name, "dtype": args.dtype, "seed": args.seed, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
