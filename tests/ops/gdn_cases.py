"""Cases and helpers of the gated delta rule's own tests (both modes): its option matrix, its shapes, the problem
of a call, and finite differences of its float64 references.

`check_backend` runs a backend of the recurrent or the chunked op on generator inputs (host or CuPy) and compares o,
the final state and every gradient (dh0 and the dht path included) with the float64 recurrent reference (the
definition of the op; the chunked form must equal it), through the contract tests' comparison.
`check_against_fd` checks a float64 reference's hand-written backward against central finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rawdelta.ops.common.validation import validate
from rawdelta.ops.gated_delta_rule.definition import CHUNK, RECURRENT, GDNProblem
from rawdelta.testing import gated_delta_rule_inputs, grad_label
from rawdelta.testing.inputs import split_op_args

from ..contract import _ops
from ..contract._ops import finite_difference

GRAD_NAMES = RECURRENT.differentiable


def make_problem(mode: str | None = None, **kw: Any) -> GDNProblem:
    """The validated problem of a call: of the chunked op when `mode` is ``"chunk"`` or ``chunk_size`` is given, else
    of the recurrent op (``backend`` defaults to ``"numpy"``)."""
    op = CHUNK if mode == "chunk" or (mode is None and "chunk_size" in kw) else RECURRENT
    return validate(op, {"backend": "numpy", **kw})


def check_backend(backend: str, inputs: dict[str, Any], *, use_dht: bool = True, device: bool = False,
                  drop: tuple[str, ...] = (), mode: str = "recurrent", chunk_size: int = 16,
                  dtype: str | None = None, **extra: Any) -> None:
    """Run `backend` on generator `inputs` (host; ``device`` copies them to the GPU) and compare o, ht and every
    gradient with the float64 recurrent reference; ``mode="chunk"`` runs ``chunk_gated_delta_rule`` with
    `chunk_size`. `dtype` overrides the tolerance row."""
    kw, do, dht = split_op_args(inputs)
    for name in drop:
        kw.pop(name)
    kw.update(extra)
    op = CHUNK if mode == "chunk" else RECURRENT
    if mode == "chunk":
        kw["chunk_size"] = chunk_size
    _ops.check_backend(op, backend, kw, do, dht if use_dht else None, device=device, dtype=dtype)


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


FD_RTOL = 1e-6

Forward = Callable[[GDNProblem], tuple[np.ndarray, np.ndarray]]
Backward = Callable[[GDNProblem, np.ndarray, np.ndarray | None], dict[str, Any]]


def _fd_loss(forward: Forward, p: GDNProblem, do: np.ndarray, dht: np.ndarray | None) -> float:
    o, ht = forward(p)
    val = float(np.sum(o * do))
    if dht is not None:
        val += float(np.sum(ht * dht))
    return val


def check_against_fd(p: GDNProblem, do: np.ndarray, dht: np.ndarray | None, forward: Forward,
                     backward: Backward) -> None:
    """Every element of every gradient of `backward` against finite differences of `forward` (float64 inputs)."""
    grads = backward(p, do, dht)
    assert set(grads) <= set(GRAD_NAMES)
    for name in GRAD_NAMES:
        x = getattr(p, name)
        gr = grads.get(name)
        if x is None or (name == "dt_bias" and not p.use_gate_in_kernel):
            assert gr is None, f"{grad_label(name)} should be absent"
            continue
        assert gr is not None, f"{grad_label(name)} missing"
        assert gr.shape == x.shape and gr.dtype == np.float64, (name, gr.shape, gr.dtype)
        fd = finite_difference(lambda q: _fd_loss(forward, q, do, dht), p, name)
        scale = max(float(np.linalg.norm(fd)), 1e-12)
        rel = float(np.linalg.norm(gr - fd)) / scale
        worst = float(np.max(np.abs(gr - fd))) / max(float(np.max(np.abs(fd))), 1e-12)
        assert rel < FD_RTOL and worst < 10 * FD_RTOL, f"d{name}: relative error {rel:.2e}, worst element {worst:.2e}"
