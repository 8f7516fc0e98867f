"""What GLA's own tests share: a forward and backward of any GLA op on any backend, and its comparison."""

from __future__ import annotations

from typing import Any

import numpy as np

import rawdelta
from rawdelta.testing import gla_inputs
from rawdelta.testing.inputs import split_op_args

RECURRENT, CHUNK, FUSED_CHUNK = "fused_recurrent_gla", "chunk_gla", "fused_chunk_gla"


def inputs(dtype: str = "float64", **params: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """``(arrays and offsets, do, dht)`` from the generator (every gate in float64 for float64 inputs)."""
    kw, do, dht = split_op_args(gla_inputs(**params, dtype=dtype))
    if dtype == "float64":
        kw = {n: (x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x)
              for n, x in kw.items()}
    return kw, do, dht


def run(op: str, kw: dict[str, Any], do: Any, dht: Any, backend: str = "numpy", **options: Any
        ) -> dict[str, np.ndarray | None]:
    """Outputs (``o``, ``final_state``) and gradients by input name of `op` on `backend`; the recurrent op takes the
    gate as ``gk``, the chunked ones as ``g`` (the generator gives both, equal)."""
    names = {RECURRENT: ("q", "k", "v", "gk", "gv", "initial_state", "cu_seqlens"),
             CHUNK: ("q", "k", "v", "g", "initial_state", "cu_seqlens")}[RECURRENT if op == RECURRENT else CHUNK]
    args = {n: x for n, x in kw.items() if n in names}
    (o, ht), res = getattr(rawdelta, f"{op}_fwd")(**args, **options, output_final_state=True, backend=backend)
    grads = getattr(rawdelta, f"{op}_bwd")(res, do, dht)._asdict()
    grads["gate"] = grads.pop("gk") if op == RECURRENT else grads.pop("g")
    return {"o": o, "final_state": ht, **grads}


def assert_same(ref: dict[str, Any], got: dict[str, Any], rtol: float) -> None:
    """Every present result of `got` equals `ref`'s to a max-abs error of ``rtol * max|ref|``."""
    for name, r in ref.items():
        g = got.get(name)
        assert (r is None) == (g is None), name
        if r is None:
            continue
        assert g.shape == r.shape, (name, g.shape, r.shape)
        err = float(np.max(np.abs(np.asarray(g, np.float64) - r), initial=0.0))
        bound = rtol * float(np.max(np.abs(r), initial=0.0))
        assert err <= bound, f"{name}: max-abs error {err:.3e} > {bound:.3e}"
