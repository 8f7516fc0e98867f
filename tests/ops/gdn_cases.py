"""Cases and the one comparison routine shared by the backend tests of the gated delta rule (both modes).

`check_backend` runs a backend of the recurrent or the chunked mode on generator inputs (host or CuPy)
and compares o, the final state and every gradient (dh0 and the dht path included) with the float64
recurrent reference in naive.py (the definition of the op; the chunked form must equal it).
`check_against_fd` checks a float64 reference's hand-written backward against central finite differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from rawdelta.ops.gated_delta_rule import naive
from rawdelta.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd, chunk_gated_delta_rule_fwd
from rawdelta.ops.gated_delta_rule.problem import GDNProblem, make_problem
from rawdelta.ops.gated_delta_rule.recurrent import (
    GatedDeltaRuleGrads,
    fused_recurrent_gated_delta_rule_bwd,
    fused_recurrent_gated_delta_rule_fwd,
)
from rawdelta.testing import assert_close, gated_delta_rule_inputs, to_device, to_host
from rawdelta.testing.inputs import split_op_args


def _grad_label(name: str) -> str:
    return "dh0" if name == "initial_state" else "d" + name


def _tol_dtype(dtype: Any) -> str:
    # The numba backend computes in float32 whatever the input dtype, so float64 inputs get float32 bounds.
    name = np.dtype(dtype).name
    return "float32" if name == "float64" else name


def check_backend(backend: str, inputs: dict[str, Any], *, use_dht: bool = True, device: bool = False,
                  drop: tuple[str, ...] = (), mode: str = "recurrent", chunk_size: int = 16,
                  dtype: str | None = None, **extra: Any) -> None:
    """Run `backend` on `inputs` (host or CuPy) and compare o, ht and every gradient with naive.py.

    ``mode="chunk"`` runs ``chunk_gated_delta_rule`` with `chunk_size`; `dtype` overrides the tolerance
    row (default: the inputs' dtype, float32 for float64 inputs on non-numpy backends).
    """
    kw, do, dht = split_op_args(inputs)
    for name in drop:
        kw.pop(name)
    kw.update(extra)
    if not use_dht:
        dht = None
    if dtype is None:
        dtype = "float64" if backend == "numpy" and kw["q"].dtype == np.float64 else _tol_dtype(kw["q"].dtype)

    p = make_problem(**kw, output_final_state=True, backend="numpy")
    o_ref, ht_ref = naive.recurrent_forward(p)
    grads_ref = naive.recurrent_backward(p, do, dht)

    host_copies = {n: x.copy() for n, x in kw.items() if isinstance(x, np.ndarray)}
    if device:
        import cupy

        kw = to_device(kw)
        do = cupy.asarray(do)
        dht = None if dht is None else cupy.asarray(dht)
    if mode == "chunk":
        (o, ht), res = chunk_gated_delta_rule_fwd(**kw, output_final_state=True, backend=backend,
                                                  chunk_size=chunk_size)
        grads = chunk_gated_delta_rule_bwd(res, do, dht)
    else:
        (o, ht), res = fused_recurrent_gated_delta_rule_fwd(**kw, output_final_state=True, backend=backend)
        grads = fused_recurrent_gated_delta_rule_bwd(res, do, dht)

    assert type(o) is type(kw["q"]) and type(ht) is type(kw["q"])
    assert o.shape == (p.B, p.T, p.HV, p.V) and o.dtype == kw["v"].dtype
    assert ht.shape == (p.N, p.HV, p.K, p.V)
    assert_close("o", o_ref, o, dtype=dtype)
    assert_close("ht", ht_ref, ht, dtype=dtype)
    for name in GatedDeltaRuleGrads._fields:
        got = getattr(grads, name)
        if kw.get(name) is None:
            assert got is None, f"gradient of absent input {name}"
            continue
        if mode == "chunk" and name in ("gk", "gv"):
            continue
        assert got is not None, f"missing gradient of {name}"
        assert type(got) is type(kw["q"]) and got.shape == kw[name].shape, name
        assert_close(_grad_label(name), grads_ref[name], got, dtype=dtype)
    for n, x in host_copies.items():  # inputs are never modified
        np.testing.assert_array_equal(to_host(kw[n]), x, err_msg=n)


# (name, generator options, op keyword arguments added, inputs dropped)
OPTIONS = [
    ("no_gates", {"g": False}, {}, ()),
    ("g", {}, {}, ()),
    ("gk", {"g": False, "gk": True}, {}, ()),
    ("gv", {"g": False, "gv": True}, {}, ()),
    ("g_gk_gv", {"gk": True, "gv": True}, {}, ()),
    ("beta_per_v", {"beta_per_v": True, "gv": True}, {}, ()),
    ("beta_none", {"beta": False}, {}, ()),
    ("l2norm", {"use_qk_l2norm_in_kernel": True}, {}, ()),
    ("beta_sigmoid", {"use_beta_sigmoid_in_kernel": True}, {}, ()),
    ("beta_sigmoid_neg_eigval", {"use_beta_sigmoid_in_kernel": True}, {"allow_neg_eigval": True}, ()),
    ("beta_sigmoid_per_v", {"use_beta_sigmoid_in_kernel": True, "beta_per_v": True}, {"allow_neg_eigval": True},
     ()),
    ("gate_in_kernel", {"use_gate_in_kernel": True}, {}, ()),
    ("gate_in_kernel_no_dt_bias", {"use_gate_in_kernel": True}, {}, ("dt_bias",)),
    ("gate_in_kernel_gk_gv", {"use_gate_in_kernel": True, "gk": True, "gv": True}, {}, ()),
    ("everything", {"use_qk_l2norm_in_kernel": True, "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True,
                    "gk": True, "gv": True, "beta_per_v": True}, {"allow_neg_eigval": True}, ()),
]


SHAPES = [
    ("grouped_2x", {"B": 2, "T": 4, "H": 1, "HV": 2, "K": 4, "V": 3}),
    ("grouped_3x", {"B": 1, "T": 5, "H": 2, "HV": 6, "K": 3, "V": 4, "gk": True}),
    ("T1", {"B": 2, "T": 1, "H": 2, "K": 4, "V": 4}),
    ("K_gt_V", {"B": 1, "T": 6, "H": 1, "K": 8, "V": 3}),
    ("K_lt_V", {"B": 1, "T": 6, "H": 1, "K": 3, "V": 8, "gv": True}),
    ("no_h0", {"B": 2, "T": 5, "H": 1, "K": 4, "V": 4, "initial_state": False}),
    ("varlen_empty", {"B": 1, "T": 0, "H": 2, "K": 4, "V": 3, "seqlens": (3, 0, 4, 1)}),
    ("varlen_empty_ends", {"B": 1, "T": 0, "H": 1, "HV": 2, "K": 4, "V": 3, "seqlens": (0, 5, 0), "gk": True,
                           "gv": True, "beta_per_v": True}),
    ("varlen_no_h0", {"B": 1, "T": 0, "H": 1, "K": 4, "V": 3, "seqlens": (2, 1, 0, 3), "initial_state": False}),
]


_RECURRENT_ONLY = ("gk", "gv", "beta_per_v")

# The options and shapes the chunked mode has (no gk, gv or per-V beta), plus shapes that cross chunks.
CHUNK_OPTIONS = [o for o in OPTIONS if not any(o[1].get(n) for n in _RECURRENT_ONLY)]
CHUNK_SHAPES = [(name, {n: v for n, v in s.items() if n not in _RECURRENT_ONLY}) for name, s in SHAPES] + [
    ("T_off_chunk", {"B": 2, "T": 37, "H": 1, "HV": 2, "K": 8, "V": 5}),
    ("varlen_crossing", {"B": 1, "T": 0, "H": 2, "K": 6, "V": 7, "seqlens": (17, 0, 33, 1, 16)}),
]


def make_inputs(shape: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Generator inputs from a SHAPES-style dict (B, T, H, K, V plus generator options)."""
    s = dict(shape)
    return gated_delta_rule_inputs(s.pop("B"), s.pop("T"), s.pop("H"), s.pop("K"), s.pop("V"), **s, **kw)


FD_STEP = 1e-6
FD_RTOL = 1e-6

Forward = Callable[[GDNProblem], tuple[np.ndarray, np.ndarray]]
Backward = Callable[[GDNProblem, np.ndarray, np.ndarray | None], dict[str, Any]]


def _fd_loss(forward: Forward, p: GDNProblem, do: np.ndarray, dht: np.ndarray | None) -> float:
    o, ht = forward(p)
    val = float(np.sum(o * do))
    if dht is not None:
        val += float(np.sum(ht * dht))
    return val


def finite_difference(forward: Forward, p: GDNProblem, name: str, do: np.ndarray, dht: np.ndarray | None
                      ) -> np.ndarray:
    """Central differences of ``L = sum(o * do) + sum(ht * dht)`` w.r.t. every element of input `name` (float64)."""
    x = getattr(p, name)
    assert x.dtype == np.float64
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += FD_STEP
        xm[i] -= FD_STEP
        fd[i] = (_fd_loss(forward, dataclasses.replace(p, **{name: xp}), do, dht)
                 - _fd_loss(forward, dataclasses.replace(p, **{name: xm}), do, dht)) / (2 * FD_STEP)
    return fd


def check_against_fd(p: GDNProblem, do: np.ndarray, dht: np.ndarray | None, forward: Forward,
                     backward: Backward) -> None:
    """Every element of every gradient of `backward` against finite differences of `forward` (float64 inputs)."""
    grads = backward(p, do, dht)
    names = GatedDeltaRuleGrads._fields
    assert set(grads) <= set(names)
    for name in names:
        x = getattr(p, name)
        gr = grads.get(name)
        if x is None or (name == "dt_bias" and not p.use_gate_in_kernel):
            assert gr is None, f"d{name} should be absent"
            continue
        assert gr is not None, f"d{name} missing"
        assert gr.shape == x.shape and gr.dtype == np.float64, (name, gr.shape, gr.dtype)
        fd = finite_difference(forward, p, name, do, dht)
        scale = max(float(np.linalg.norm(fd)), 1e-12)
        rel = float(np.linalg.norm(gr - fd)) / scale
        worst = float(np.max(np.abs(gr - fd))) / max(float(np.max(np.abs(fd))), 1e-12)
        assert rel < FD_RTOL and worst < 10 * FD_RTOL, f"d{name}: relative error {rel:.2e}, worst element {worst:.2e}"


def record_launches(monkeypatch: Any, prefix: str = "") -> list[str]:
    """From now on, the name of every kernel the CUDA chunked op launches (those starting with `prefix`), in the
    order their launches are built (``cuda_chunk._prepared_launch``, through which every launch goes)."""
    from rawdelta.ops.gated_delta_rule import cuda_chunk

    names: list[str] = []
    prepared_launch = cuda_chunk._prepared_launch

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(prefix):
            names.append(name)
        return prepared_launch(name, *args, **kwargs)

    monkeypatch.setattr(cuda_chunk, "_prepared_launch", spy)
    return names
