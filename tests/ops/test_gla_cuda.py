"""fused_recurrent_gla's cuda backend (the gated delta rule's recurrent kernels with the plain update rule) on what
the contract tests do not run: ``reverse=True``, resets in some elements of a per-key or per-value gate, 16-bit
inputs at K = 256, the decode step in place in both state layouts. Each is compared with the float64 numpy backend
of the same call (forward and every gradient, dh0 and the dht path included)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.ops import registry
from rawdelta.testing import assert_close, gla_inputs, to_device, to_host
from rawdelta.testing.inputs import split_op_args

from ..contract._ops import check_backend

pytestmark = pytest.mark.gpu
OP = registry.op("fused_recurrent_gla")


def _inputs(params: dict[str, Any], seed: int, dtype: str = "float32") -> tuple[dict[str, Any], Any, Any]:
    kw, do, dht = split_op_args(gla_inputs(**params, seed=seed, dtype=dtype))
    return {n: x for n, x in kw.items() if n in OP.takes}, do, dht


@pytest.mark.parametrize("state_v_first", [False, True])
def test_reverse(state_v_first: bool) -> None:
    kw, do, dht = _inputs({"B": 1, "T": 0, "H": 2, "K": 37, "V": 40, "seqlens": (5, 0, 70), "gv": True}, 2)
    if state_v_first:
        kw["initial_state"] = np.ascontiguousarray(kw["initial_state"].swapaxes(-1, -2))
        dht = np.ascontiguousarray(dht.swapaxes(-1, -2))
    check_backend(OP, "cuda", {**kw, "reverse": True, "state_v_first": state_v_first}, do, dht, device=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_resets_in_some_elements(reverse: bool) -> None:
    kw, do, dht = _inputs({"B": 2, "T": 20, "H": 2, "K": 16, "V": 8, "gv": True}, 3)
    for name in ("gk", "gv"):
        kw[name] = kw[name].copy()
        kw[name][:, 6, :, 1:3] = -np.inf
        kw[name][:, 16, 0, 0] = -1e30
    check_backend(OP, "cuda", {**kw, "reverse": reverse}, do, dht, device=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_inputs_at_k256(dtype: str) -> None:
    kw, do, dht = _inputs({"B": 2, "T": 33, "H": 2, "K": 256, "V": 64}, 4, dtype)
    check_backend(OP, "cuda", kw, do, dht, device=True)


@pytest.mark.parametrize("state_v_first", [False, True])
def test_decode_in_place(state_v_first: bool) -> None:
    """One token per sequence, the final state written over the initial state (in the caller's layout)."""
    kw, _, _ = _inputs({"B": 4, "T": 1, "H": 2, "K": 128, "V": 128, "gv": True}, 5, "bfloat16")
    h0 = kw["initial_state"]
    if state_v_first:
        h0 = np.ascontiguousarray(h0.swapaxes(-1, -2))
    ref_o, ref_ht = rawdelta.fused_recurrent_gla(**{**kw, "initial_state": h0}, output_final_state=True,
                                                 state_v_first=state_v_first, backend="numpy")
    dev = to_device({**kw, "initial_state": h0})
    state = dev["initial_state"]
    o, ht = rawdelta.fused_recurrent_gla(**dev, output_final_state=True, inplace_final_state=True,
                                         state_v_first=state_v_first, backend="cuda")
    assert ht is state
    assert_close("o", np.asarray(ref_o, np.float64), to_host(o), dtype="bfloat16")
    assert_close("final_state", np.asarray(ref_ht, np.float64), to_host(ht), dtype="bfloat16")
