"""Extreme gates and row values on every backend of every op (issue 24), against the op's own numpy backend.

- Hard reset: a gate of -inf at token t (an array declared ``gate=True``, every element of it at t) zeroes the
  decayed state before t's update, so outputs, final state and gradients equal those of the same call split at t by
  ``cu_seqlens``, the second piece starting from a zero state; the reset gate's own gradient is 0 and the first
  piece sees no final-state cotangent. Gates of -1e30 and -1e4 (decays that are 0 in every precision) are the same
  reset. A raw gate that the op activates in the kernel (``use_gate_in_kernel``) is no log-decay and is not tested
  here.
- A gate of 0 is an ordinary step.
- Causality: a NaN or an infinity at token t in a per-token float32 array (the gates, beta) reaches neither the
  outputs of the tokens before t (those of the call truncated to ``[0, t)``) nor, with ``do`` zero from t on and
  no final-state cotangent, their gradients or dh0. Later tokens are the caller's business: not compared.

The numpy backend runs in float64 on one case per set of options; numba runs in the simulator on a few, and on the
GPU every case runs on numba and cuda, chunked ops at every chunk size and in bfloat16 at K = 64 (the Hopper
kernels' path).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops.common.opdef import OpCase, OpDef
from rawdelta.testing import assert_close, grad_label, reference_results, to_device, to_host

from ._ops import OPS, as_tuple, float64, inputs, tolerance_dtype

RESETS = {"-inf": -np.inf, "-1e30": -1e30, "-1e4": -1e4}
NON_FINITE = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
RECURRENT_BLOCK = 4  # an op without chunks runs T = 2 * 4 + 8 tokens, its checks at tokens 4, 8 and 7
# NaN and infinities are the inputs here: the arithmetic on the tokens after them warns, by design.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _dims(op: OpDef) -> set[str]:
    return {d for a in op.family.arrays for d in a.shape + (a.alt_shape or ())}


def _option_cases(op: OpDef) -> list[OpCase]:
    """The op's dense declared cases, the first of each set of options (shapes and chunk size aside)."""
    seen, out = set(), []
    for c in op.cases:
        if "seqlens" in c.params:
            continue
        key = (tuple(sorted((n, v) for n, v in c.params.items() if n not in _dims(op) | {"seed"})),
               tuple(sorted((n, v) for n, v in c.call.items() if n != "chunk_size")))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


class Setup:
    """One parametrisation's call: the case at B = 1 and ``T = 2 chunk + 8`` tokens, the chunk size (the call's, or
    for an op without chunks a block that places its checks), dtype, K and V overrides."""

    def __init__(self, op: OpDef, case: OpCase, chunk: int, dtype: str = "float32", **dims: int) -> None:
        self.op, self.case, self.chunk, self.dtype = op, case, chunk, dtype
        self.T = 2 * chunk + 8
        self.positions = {"first_row": chunk, "inside": chunk + 4, "last_row": 2 * chunk - 1}
        self.params = {**case.params, "B": 1, "T": self.T, **dims}
        self.call = {n: v for n, v in case.call.items() if n != "chunk_size"}
        if "chunk_size" in op.takes:
            self.call["chunk_size"] = chunk

    def inputs(self, backend: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
        kw, do, dht = inputs(self.op, self.params, "float32" if backend == "numpy" else self.dtype, seed=24)
        kw.update(self.call)
        if backend != "numpy":
            return kw, do, dht
        return float64(kw), do.astype(np.float64), None if dht is None else dht.astype(np.float64)


def _row_arrays(op: OpDef, kw: dict[str, Any]) -> list[str]:
    """The per-token float32 arrays of a call (gates, beta): where a NaN or an infinity may come in."""
    return [a.name for a in op.arrays if a.float32 and "T" in a.shape and kw.get(a.name) is not None]


def _gates(op: OpDef, kw: dict[str, Any]) -> list[str]:
    """The call's log-decays: arrays declared ``gate=True``, given, and not a raw input to an in-kernel gate."""
    return [a.name for a in op.arrays if a.gate and kw.get(a.name) is not None
            and not (a.name == "g" and kw.get("use_gate_in_kernel"))]


def _at(x: np.ndarray, t: int, value: float) -> np.ndarray:
    """A copy of a ``[B, T, ...]`` array with every element of token t set to `value`."""
    x = x.copy()
    x[:, t] = value
    return x


def _run(op: OpDef, backend: str, kw: dict[str, Any], do: np.ndarray, dht: np.ndarray | None, device: bool
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Outputs by name and gradients by input name of `op` on `backend`, on the host."""
    if device:
        import cupy

        kw, do = to_device(kw), cupy.asarray(do)
        dht = None if dht is None else cupy.asarray(dht)
    extra = {"output_final_state": True} if op.has_state else {}
    outs, res = getattr(rawdelta, f"{op.name}_fwd")(**kw, **extra, backend=backend)
    bwd = getattr(rawdelta, f"{op.name}_bwd")
    grads = bwd(res, do, dht) if op.has_state else bwd(res, do)
    return ({spec.name: to_host(x) for spec, x in zip(op.outputs, as_tuple(op, outs))},
            {n: to_host(getattr(grads, n)) for n in grads._fields})


def check_reset(s: Setup, gate: str, value: float, t: int, backend: str, device: bool = False) -> None:
    """A reset at t equals the call split at t (second piece from zeros, first piece without a final cotangent)."""
    op = s.op
    kw, do, dht = s.inputs(backend)
    kw[gate] = _at(kw[gate], t, value)
    split = {**kw, gate: _at(kw[gate], t, 0.0), "cu_seqlens": np.array([0, t, s.T], dtype=np.int64)}
    for a in op.arrays:
        if a.state and kw.get(a.name) is not None:
            split[a.name] = np.concatenate([kw[a.name], np.zeros_like(kw[a.name])])
    split_dht = None if dht is None else np.concatenate([np.zeros_like(dht), dht])
    ref_out, ref_grads = reference_results(op, split, do, split_dht, mode_op=True)
    out, grads = _run(op, backend, kw, do, dht, device)
    dtype = tolerance_dtype(backend, kw)
    for spec in op.outputs:
        assert_close(spec.name, ref_out[spec.name][1:] if spec.shape[0] == "N" else ref_out[spec.name],
                     out[spec.name], dtype=dtype)
    for n, ref in ref_grads.items():
        if ref is not None:
            assert_close(grad_label(n), ref[:1] if op.family.array(n).state else ref, grads[n], dtype=dtype)


def check_zero_gate(s: Setup, gate: str, t: int, backend: str, device: bool = False) -> None:
    """A gate of exactly 0 at t: the backend equals the numpy backend on the same call."""
    op = s.op
    kw, do, dht = s.inputs(backend)
    kw[gate] = _at(kw[gate], t, 0.0)
    ref_out, ref_grads = reference_results(op, float64(kw), do, dht, mode_op=True)
    out, grads = _run(op, backend, kw, do, dht, device)
    dtype = tolerance_dtype(backend, kw)
    for spec in op.outputs:
        assert_close(spec.name, ref_out[spec.name], out[spec.name], dtype=dtype)
    for n, ref in ref_grads.items():
        if ref is not None:
            assert_close(grad_label(n), ref, grads[n], dtype=dtype)


def check_causality(s: Setup, name: str, value: float, t: int, backend: str, device: bool = False) -> None:
    """A non-finite value at t: outputs before t equal the call truncated to [0, t); with do zero from t on and no
    dht, so do the gradients of the tokens before t and of the initial state."""
    op = s.op
    kw, do, _ = s.inputs(backend)
    axis = {a.name: a.shape.index("T") for a in op.arrays if "T" in a.shape}
    trunc = {n: (np.take(x, range(t), axis=axis[n]) if n in axis and isinstance(x, np.ndarray) else x)
             for n, x in kw.items()}
    kw[name] = _at(kw[name], t, value)
    do = do.copy()
    do[:, t:] = 0
    ref_out, ref_grads = reference_results(op, trunc, do[:, :t], None, mode_op=True)
    out, grads = _run(op, backend, kw, do, None, device)
    dtype = tolerance_dtype(backend, kw)
    for spec in op.outputs:
        if "T" in spec.shape:
            assert_close(spec.name, ref_out[spec.name], np.take(out[spec.name], range(t), axis=spec.shape.index("T")),
                         dtype=dtype)
    for n, ref in ref_grads.items():
        arr = op.family.array(n)
        if ref is None or not (arr.state or n in axis):  # a sum over every token (A_log, dt_bias) may see t
            continue
        got = grads[n] if arr.state else np.take(grads[n], range(t), axis=axis[n])
        assert_close(grad_label(n), ref, got, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Parametrisations
# ---------------------------------------------------------------------------------------------------------------------


def _params(setups: list[Setup], backend: str, select: Any = None) -> list[Any]:
    """``pytest.param(setup, kind, array name, value, token)`` for every check of every setup on `backend` (for which
    ``select(kind, name, label, position)`` holds)."""
    out = []
    for s in setups:
        kw, _, _ = s.inputs("numpy")
        checks = [("zero", g, "0", 0.0) for g in _gates(s.op, kw)]
        if "cu_seqlens" in s.op.takes:
            checks += [("reset", g, label, v) for g in _gates(s.op, kw) for label, v in RESETS.items()]
        checks += [("causality", n, label, v) for n in _row_arrays(s.op, kw) for label, v in NON_FINITE.items()]
        for kind, name, label, value in checks:
            for position, t in s.positions.items():
                if (kind == "zero" and position != "inside") or (select and not select(kind, name, label, position)):
                    continue
                shape = f"C{s.chunk}" if "chunk_size" in s.op.takes else f"T{s.T}"
                dtype = "" if s.dtype == "float32" else f"-{s.dtype}"
                pid = f"{s.op.name}-{s.case.label}-{shape}{dtype}-{kind}-{name}={label}-{position}"
                out.append(pytest.param(s, kind, name, value, t, id=pid))
    return out


def _check(s: Setup, kind: str, name: str, value: float, t: int, backend: str, device: bool = False) -> None:
    if kind == "reset":
        check_reset(s, name, value, t, backend, device)
    elif kind == "zero":
        check_zero_gate(s, name, t, backend, device)
    else:
        check_causality(s, name, value, t, backend, device)


def _cpu_chunk(op: OpDef) -> int:
    return min(op.chunk_sizes) if op.chunk_sizes else RECURRENT_BLOCK


def _sim_setups() -> list[Setup]:
    """One case per set of per-token arrays (the gate arrays and beta) of each op."""
    out = []
    for op in OPS:
        seen = set()
        for c in _option_cases(op):
            s = Setup(op, c, _cpu_chunk(op))
            key = tuple(_row_arrays(op, s.inputs("numpy")[0]))
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def _sim_select(kind: str, name: str, label: str, position: str) -> bool:
    """The simulator runs each thread in Python: per gate a reset inside a chunk, per array a NaN inside; -1e30 at a
    chunk's first row, a zero gate and beta = +inf at a chunk's last row."""
    return ((kind, label, position) in {("reset", "-inf", "inside"), ("causality", "nan", "inside")}
            or (name, kind, label, position) in {("g", "reset", "-1e30", "first_row"), ("g", "zero", "0", "inside"),
                                                 ("beta", "causality", "+inf", "last_row")})


CPU_SETUPS = [Setup(op, c, _cpu_chunk(op)) for op in OPS for c in _option_cases(op)]
SIM_PARAMS = _params(_sim_setups(), "numba", _sim_select)


def _gpu_setups() -> list[Setup]:
    out = []
    for op in OPS:
        for c in _option_cases(op):
            out += [Setup(op, c, chunk) for chunk in (op.chunk_sizes or (RECURRENT_BLOCK,))]
            if op.chunk_sizes:  # 16-bit inputs, chunks of 64, K and V multiples of 8: the Hopper kernels on sm_90
                out.append(Setup(op, c, max(op.chunk_sizes), "bfloat16", K=64, V=32))
    return out


GPU_SETUPS = _gpu_setups()


@pytest.mark.parametrize(("s", "kind", "name", "value", "t"), _params(CPU_SETUPS, "numpy"))
def test_numpy_backend(s: Setup, kind: str, name: str, value: float, t: int) -> None:
    _check(s, kind, name, value, t, "numpy")


@pytest.mark.numba_sim
@pytest.mark.parametrize(("s", "kind", "name", "value", "t"), SIM_PARAMS)
def test_numba_backend_in_simulator(s: Setup, kind: str, name: str, value: float, t: int) -> None:
    _check(s, kind, name, value, t, "numba")


@pytest.mark.gpu
@pytest.mark.parametrize(("s", "kind", "name", "value", "t"), _params(GPU_SETUPS, "numba"))
def test_numba_backend_on_gpu(s: Setup, kind: str, name: str, value: float, t: int) -> None:
    _check(s, kind, name, value, t, "numba", device=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("s", "kind", "name", "value", "t"),
                         _params([s for s in GPU_SETUPS if "cuda" in s.op.backends], "cuda"))
def test_cuda_backend(s: Setup, kind: str, name: str, value: float, t: int) -> None:
    _check(s, kind, name, value, t, "cuda", device=True)
