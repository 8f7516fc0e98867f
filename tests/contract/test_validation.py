"""Argument validation of every op (api.md section 6): every bad call raises the documented exception before any
computation, naming the argument and, for shapes, the expected ``[B, T, H, K] = [..]`` form with the bound values.
What only one family checks is tested in its family's tests."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import rawdelta
from rawdelta.errors import UnsupportedConfigError
from rawdelta.ops.common.opdef import OpDef

from ._ops import OPS, as_tuple, inputs, op_params, ops_taking, ops_with_state, ops_without, picks_chunk_size

# Every op's smallest adapter case is its "good call".
GOOD = {op.name: next(c for c in op.cases if c.adapters and "seqlens" not in c.params) for op in OPS}


def good(op: OpDef, **over: Any) -> tuple[dict[str, Any], Any, Any]:
    kw, do, dht = inputs(op, GOOD[op.name], "float32", seed=1)
    kw = {n: x for n, x in kw.items() if n not in ("chunk_size",)}
    kw.update(over)
    return kw, do, dht


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if any numpy backend is entered: validation must come before any computation."""
    calls: list[str] = []
    for op in OPS:
        module = __import__(op.backends["numpy"].module, fromlist=["forward"])
        for fn in ("forward", "backward"):
            def refuse(*args: Any, _fn: str = fn, **kwargs: Any) -> Any:
                calls.append(_fn)
                raise AssertionError(f"the numpy backend's {_fn} ran on an invalid call")

            monkeypatch.setattr(module, fn, refuse)
    return calls


def raises(op: OpDef, exc: type[BaseException], *patterns: str, **over: Any) -> str:
    kw, _, _ = good(op, **over)
    kw = {n: x for n, x in kw.items() if x is not None or n in over}
    with pytest.raises(exc) as info:
        getattr(rawdelta, op.name)(**kw)
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in message: {msg}"
    return msg


@pytest.mark.parametrize("op", op_params())
def test_good_call_runs(op: OpDef) -> None:
    kw, _, _ = good(op)
    outs = as_tuple(op, getattr(rawdelta, op.name)(**kw, **({"output_final_state": True} if op.has_state else {})))
    assert outs[0].shape == kw["v"].shape[:2] + outs[0].shape[2:]


# TypeError: not an array, None where required.


@pytest.mark.parametrize("bad", [pytest.param([[0.0]], id="list"), pytest.param(1.5, id="float"),
                                 pytest.param("x", id="str")])
@pytest.mark.parametrize("op", op_params())
def test_not_an_array(no_compute: list[str], op: OpDef, bad: Any) -> None:
    for a in op.arrays:
        raises(op, TypeError, rf"\b{a.name} must be an array", **{a.name: bad})
    raises(op, TypeError, r"cu_seqlens must be an array", cu_seqlens=[0, 1])
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_required_input_none_is_type_error(no_compute: list[str], op: OpDef) -> None:
    for a in op.arrays:
        if a.required:
            raises(op, TypeError, rf"{a.name} must be an array, got None", **{a.name: None})
    assert no_compute == []


# ValueError: shapes.


def _bound_before(op: OpDef, kw: dict[str, Any]) -> list[tuple[str, int, str]]:
    """``(array, axis, symbol)``: for each present array, its first axis whose symbol an earlier array binds."""
    bound = {"N"}  # bound by cu_seqlens or B before the states are checked
    out = []
    for a in op.arrays:
        x = kw.get(a.name)
        if x is None:
            continue
        names = a.alt_shape if a.alt_shape and x.ndim == len(a.alt_shape) else a.shape
        hit = next(((i, s) for i, s in enumerate(names) if s in bound), None)
        if hit is not None:
            out.append((a.name, *hit))
        bound |= set(names)
    return out


@pytest.mark.parametrize("op", op_params())
def test_bad_rank_names_the_argument_and_shape(no_compute: list[str], op: OpDef) -> None:
    kw, _, _ = good(op)
    for a in op.arrays:
        x = kw.get(a.name)
        if x is None:
            continue
        shape = "\\[" + ", ".join(a.shape) + "\\]"
        raises(op, ValueError, rf"{a.name} must be {len(a.shape)}-D {shape}", **{a.name: x[..., None, None]})
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_bad_size_names_the_dimension(no_compute: list[str], op: OpDef) -> None:
    kw, _, _ = good(op)
    for name, axis, symbol in _bound_before(op, kw):
        x = kw[name]
        shape = list(x.shape)
        shape[axis] += 1
        raises(op, ValueError, rf"{name} must have shape \[.*got {re.escape(str(tuple(shape)))}.*mismatch in {symbol}",
               **{name: np.zeros(shape, x.dtype)})
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_non_float_dtype(no_compute: list[str], op: OpDef) -> None:
    kw, _, _ = good(op)
    for a in op.arrays:
        if kw.get(a.name) is not None:
            raises(op, ValueError, rf"{a.name} must have a floating dtype.*int32",
                   **{a.name: kw[a.name].astype(np.int32)})
    assert no_compute == []


# ValueError: cu_seqlens.

CU_CASES = [
    (lambda T: np.array([[0, T]]), r"cu_seqlens must be a 1-D vector \[N \+ 1\], got shape \(1, 2\)"),
    (lambda T: np.array([], np.int64), r"cu_seqlens must be a 1-D vector \[N \+ 1\], got shape \(0,\)"),
    (lambda T: np.array([1, T]), r"cu_seqlens must start at 0, got 1"),
    (lambda T: np.array([0, 3, 2, T]), r"cu_seqlens must be non-decreasing"),
    (lambda T: np.array([0, T - 1]), r"cu_seqlens must end at T=\d+, got"),
    (lambda T: np.array([0.0, float(T)]), r"cu_seqlens must be int32 or int64, got float64"),
]


@pytest.mark.parametrize("op", op_params())
def test_bad_cu_seqlens(no_compute: list[str], op: OpDef) -> None:
    kw, _, _ = good(op, initial_state=None)
    B, T = kw["q"].shape[:2]
    one = {n: (x[:1] if isinstance(x, np.ndarray) and x.ndim >= 2 and x.shape[:2] == (B, T) else x)
           for n, x in kw.items()}
    for make, pattern in CU_CASES:
        with pytest.raises(ValueError, match=pattern):
            getattr(rawdelta, op.name)(**{**one, "cu_seqlens": make(T)})
    if B > 1:
        with pytest.raises(ValueError, match=rf"cu_seqlens requires B == 1.*got B={B}"):
            getattr(rawdelta, op.name)(**kw, cu_seqlens=np.array([0, T]))
    # the host copy is checked too, and must agree with cu_seqlens
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D vector"):
        getattr(rawdelta, op.name)(**one, cu_seqlens=np.array([[0, T]]), cu_seqlens_cpu=np.array([0, T]))
    with pytest.raises(ValueError, match=r"cu_seqlens_cpu must be the host copy"):
        getattr(rawdelta, op.name)(**one, cu_seqlens=np.array([0, T]), cu_seqlens_cpu=np.array([0.0, T]))
    assert no_compute == []


@pytest.mark.parametrize("op", ops_with_state())
def test_initial_state_rows_must_be_n(no_compute: list[str], op: OpDef) -> None:
    states = [a for a in op.arrays if a.state]
    kw, _, _ = good(op)
    st = kw.get(states[0].name)
    raises(op, ValueError, rf"{states[0].name} must have shape \[N, .*mismatch in N",
           **{states[0].name: np.zeros((st.shape[0] + 1, *st.shape[1:]), np.float32)})
    assert no_compute == []


# ValueError: static options.


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "abc", "0.5", True])
@pytest.mark.parametrize("op", ops_taking("scale"))
def test_bad_scale(no_compute: list[str], op: OpDef, scale: Any) -> None:
    raises(op, ValueError, r"scale must be", scale=scale)
    assert no_compute == []


BAD_CHUNK_SIZES = [pytest.param(p.values[0], cs, id=f"{p.id}-{cs!r}") for p in ops_taking("chunk_size")
                   for cs in (8, 64.0, None, True, "64", 128) if not (cs is None and picks_chunk_size(p.values[0]))]


@pytest.mark.parametrize(("op", "chunk_size"), BAD_CHUNK_SIZES)
def test_bad_chunk_size(no_compute: list[str], op: OpDef, chunk_size: Any) -> None:
    raises(op, ValueError, rf"chunk_size must be one of {re.escape(str(op.chunk_sizes))}", chunk_size=chunk_size)
    assert no_compute == []


@pytest.mark.parametrize("op", [p for p in ops_taking("chunk_size") if picks_chunk_size(p.values[0])])
def test_chunk_size_none_is_one_of_the_ops_sizes(op: OpDef) -> None:
    from rawdelta.ops.common.validation import validate

    kw, _, _ = good(op)
    p = validate(op, {**kw, "chunk_size": None})
    assert p.chunk_size in op.chunk_sizes
    outs = getattr(rawdelta, op.name)(**kw, chunk_size=None)
    explicit = getattr(rawdelta, op.name)(**kw, chunk_size=p.chunk_size)
    for a, b in zip(as_tuple(op, outs), as_tuple(op, explicit)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", op_params())
def test_bad_backend(no_compute: list[str], op: OpDef) -> None:
    raises(op, ValueError, r"backend must be one of \('auto', 'cuda', 'numba', 'numpy'\), got 'torch'", backend="torch")
    if "cuda" in op.backends:
        raises(op, ValueError, r"backend='cuda' needs device arrays.*got host arrays", backend="cuda")
    else:  # the missing backend is the answer, whatever else it would need
        raises(op, NotImplementedError, rf"{op.name} has no 'cuda' backend", backend="cuda")
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_numba_refuses_float64(no_compute: list[str], op: OpDef) -> None:
    """The numba backend computes in float32: float64 q/k/v are refused (not silently computed in float32)."""
    kw, _, _ = good(op)
    f64 = {n: kw[n].astype(np.float64) for n in ("q", "k", "v")}
    raises(op, NotImplementedError, r"backend='numba' computes in float32.*got float64", **f64, backend="numba")
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_unavailable_backend_is_named(monkeypatch: pytest.MonkeyPatch, op: OpDef) -> None:
    from rawdelta.errors import BackendUnavailableError
    from rawdelta.ops.common import validation

    monkeypatch.setattr(validation, "numba_unavailable_reason", lambda: "numba-cuda sees no CUDA GPU")
    raises(op, BackendUnavailableError, r"backend='numba' cannot run here: numba-cuda sees no CUDA GPU",
           backend="numba")


@pytest.mark.parametrize("op", ops_without("cuda"))
def test_a_backend_the_op_lacks_is_named(no_compute: list[str], monkeypatch: pytest.MonkeyPatch, op: OpDef) -> None:
    """An op without cuda kernels refuses the cuda backend, asked for or picked by ``"auto"`` for device arrays, with
    UnsupportedConfigError naming the op and the backends it has. Here host arrays pass for device arrays (no GPU is
    needed); test_cuda_request_without_cuda_kernels runs it with CuPy arrays on a GPU."""
    from rawdelta.ops.common import validation

    monkeypatch.setattr(validation, "_check_places", lambda arrs, v: True)
    names = re.escape(str(tuple(op.backends)))
    for backend in ("cuda", "auto"):
        raises(op, UnsupportedConfigError, rf"{op.name} has no 'cuda' backend \(it has {names}\)", backend=backend)
    assert no_compute == []


@pytest.mark.parametrize("op", op_params())
def test_many_errors_reported_together(no_compute: list[str], op: OpDef) -> None:
    kw, _, _ = good(op)
    bad = {"k": kw["k"][..., None], "backend": "tpu"}
    patterns = [r"k must be", r"backend must be one of"]
    if "scale" in op.takes:
        bad["scale"] = -2.0
        patterns.append(r"scale must be")
    msg = raises(op, ValueError, *patterns, **bad)
    assert msg.count(";") >= len(patterns) - 1
    assert no_compute == []


# The backward: cotangents, and what it refuses.


@pytest.mark.parametrize("op", op_params())
def test_backward_cotangent_checks(no_compute: list[str], op: OpDef) -> None:
    from rawdelta.ops.common.api import residuals_type
    from rawdelta.ops.common.validation import validate

    kw, do, dht = good(op)
    res = residuals_type(op)(validate(op, {**kw, "backend": "numpy"}), None)
    bwd = getattr(rawdelta, f"{op.name}_bwd")
    with pytest.raises(ValueError, match=rf"do must have shape \[.*got {re.escape(str(do[..., :-1].shape))}"):
        bwd(res, do[..., :-1])
    with pytest.raises(TypeError, match=r"do must be an array"):
        bwd(res, do.tolist())
    if op.has_state:
        with pytest.raises(ValueError, match=r"dht must be \d-D"):
            bwd(res, do, dht[0])
    assert no_compute == []


@pytest.mark.parametrize("op", ops_taking("inplace_final_state"))
def test_backward_after_inplace_final_state_refuses(op: OpDef) -> None:
    kw, do, _ = good(op)
    outs, res = getattr(rawdelta, f"{op.name}_fwd")(**kw, inplace_final_state=True, backend="numpy")
    assert outs[1] is kw["initial_state"]
    with pytest.raises(ValueError, match="inplace_final_state"):
        getattr(rawdelta, f"{op.name}_bwd")(res, do)
    with pytest.raises(ValueError, match=r"inplace_final_state=True needs initial_state"):
        getattr(rawdelta, op.name)(**{**kw, "initial_state": None}, inplace_final_state=True)
    with pytest.raises(ValueError, match=r"inplace_final_state=True needs a C-contiguous float32 initial_state"):
        getattr(rawdelta, op.name)(**{**kw, "initial_state": kw["initial_state"].astype(np.float16)},
                                   inplace_final_state=True)


@pytest.mark.parametrize("op", op_params())
def test_naive_references_validate_too(op: OpDef) -> None:
    for ref in op.naive:
        kw, do, dht = good(op)
        with pytest.raises(ValueError, match=r"k must be"):
            getattr(rawdelta, ref.name)(**{**kw, "k": kw["k"][..., None]})
        with pytest.raises(TypeError, match=r"q must be an array"):
            getattr(rawdelta, f"{ref.name}_bwd")(**{**kw, "q": [0.0]}, do=do)


@pytest.mark.gpu
@pytest.mark.parametrize("op", op_params())
def test_mixed_host_and_device_arrays(op: OpDef) -> None:
    import cupy

    kw, _, _ = good(op)
    with pytest.raises(TypeError, match="all host or all device"):
        getattr(rawdelta, op.name)(**{**kw, "k": cupy.asarray(kw["k"])})


@pytest.mark.gpu
@pytest.mark.parametrize("op", ops_without("cuda"))
def test_cuda_request_without_cuda_kernels(op: OpDef) -> None:
    import cupy

    kw, _, _ = good(op)
    dev = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    for backend in ("cuda", "auto"):
        with pytest.raises(UnsupportedConfigError, match=rf"{op.name} has no 'cuda' backend"):
            getattr(rawdelta, op.name)(**dev, backend=backend)
    outs = getattr(rawdelta, op.name)(**dev, backend="numba")  # its other device backend still runs
    assert isinstance(as_tuple(op, outs)[0], cupy.ndarray)


def test_unsupported_config_error_is_not_implemented() -> None:
    # api.md: a valid combination a backend does not support raises NotImplementedError (a subclass here).
    assert issubclass(UnsupportedConfigError, NotImplementedError)


@pytest.mark.parametrize("T, cu_seqlens", [(70, None), (1, None), (0, None), (70, [0, 0, 5, 70, 70])])
def test_problem_counts_chunks_per_sequence(T: int, cu_seqlens: list[int] | None) -> None:
    """Problem.num_chunks: chunks never cross sequences; a fixed-length batch counts N ceil(T / chunk) without the
    per-sequence lengths, varlen (empty sequences included) sums its sequences'."""
    from rawdelta.ops import registry
    from rawdelta.ops.common.validation import validate

    B = 2 if cu_seqlens is None else 1
    x = np.zeros((B, T, 2, 8), np.float32)
    args = {"q": x, "k": x, "v": x, "g": x, "backend": "numpy"}
    if cu_seqlens is not None:
        args["cu_seqlens"] = np.array(cu_seqlens, np.int32)
    p = validate(registry.op("chunk_gla"), args)
    lengths = [T] * B if cu_seqlens is None else np.diff(cu_seqlens).tolist()
    for chunk in (16, 64):
        assert p.num_chunks(chunk) == sum(-(-n // chunk) for n in lengths)
