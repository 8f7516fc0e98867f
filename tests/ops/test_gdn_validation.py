"""The gated delta rule's own validation rules (definition.py ``_check``): grouped value heads, the in-kernel gate
and beta options, what the chunked mode does not take. The rules every op shares are tests/contract's."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.testing import gated_delta_rule_inputs

# B=1, T=5, H=1, HV=2, K=3, V=4.
B, T, H, HV, K, V = 1, 5, 1, 2, 3, 4
OPS = ("fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule")


def good_inputs(**kw: Any) -> dict[str, Any]:
    inp = gated_delta_rule_inputs(B, T, H, K, V, HV=HV, seed=1, **kw)
    inp.pop("do")
    inp.pop("dht")
    return inp


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a numpy backend is entered: validation must happen before any computation."""
    from rawdelta.ops.gated_delta_rule import naive, naive_chunk

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the numpy backend ran on an invalid call")

    for module in (naive, naive_chunk):
        monkeypatch.setattr(module, "forward", refuse)
        monkeypatch.setattr(module, "backward", refuse)


def raises(op: str, exc: type[BaseException], *patterns: str, **over: Any) -> str:
    kw = {**good_inputs(), **over}
    kw = {n: a for n, a in kw.items() if not (a is None and n in ("g", "beta", "initial_state"))}
    with pytest.raises(exc) as info:
        getattr(rawdelta, op)(**kw)
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in message: {msg}"
    return msg


@pytest.mark.parametrize("op", OPS)
def test_hv_not_multiple_of_h(no_compute: None, op: str) -> None:
    q = np.zeros((B, T, 3, K), np.float32)
    raises(op, ValueError, r"HV=2 must be a multiple of the key heads H=3", q=q, k=q.copy())


@pytest.mark.parametrize("op", OPS)
def test_option_combinations(no_compute: None, op: str) -> None:
    raises(op, ValueError, r"allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True", allow_neg_eigval=True)
    raises(op, ValueError, r"use_gate_in_kernel=True needs A_log \[HV\]", use_gate_in_kernel=True)
    raises(op, ValueError, r"use_gate_in_kernel=True needs the raw gate g", use_gate_in_kernel=True,
           A_log=np.zeros(HV, np.float32), g=None)
    raises(op, ValueError, r"A_log / dt_bias are only used with use_gate_in_kernel=True",
           A_log=np.zeros(HV, np.float32))
    raises(op, ValueError, r"A_log / dt_bias are only used with use_gate_in_kernel=True",
           dt_bias=np.zeros(HV, np.float32))


@pytest.mark.parametrize("name", ["A_log", "dt_bias"])
def test_bad_a_log_dt_bias_shape(no_compute: None, name: str) -> None:
    gate = {"use_gate_in_kernel": True, "A_log": np.zeros(HV, np.float32), "dt_bias": np.zeros(HV, np.float32)}
    gate[name] = np.zeros(HV + 1, np.float32)
    raises(OPS[0], ValueError, rf"{name} must have shape \[HV\] = \[2\], got \(3,\)", **gate)
    gate[name] = np.zeros((HV, 1), np.float32)
    raises(OPS[0], ValueError, rf"{name} must be 1-D \[HV\] = \[2\], got shape \(2, 1\)", **gate)


def test_beta_per_value_dimension(no_compute: None) -> None:
    """beta ``[B, T, HV, V]`` is the recurrent mode's; the chunked mode refuses it as unsupported."""
    beta_v = np.zeros((B, T, HV, V), np.float32)
    raises(OPS[1], NotImplementedError, r"per value dimension\) is only supported by the recurrent mode", beta=beta_v)
    raises(OPS[0], ValueError, r"beta must have shape \[B, T, HV, V\] = \[1, 5, 2, 4\].*mismatch in V",
           beta=np.zeros((B, T, HV, V + 1), np.float32))


def test_chunked_mode_takes_no_per_key_or_per_value_gate() -> None:
    with pytest.raises(TypeError, match="gk"):
        rawdelta.chunk_gated_delta_rule(**good_inputs(), gk=np.zeros((B, T, HV, K), np.float32))
