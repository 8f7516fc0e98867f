"""The ``rawdelta`` command: ``check`` (self-test of every available backend), ``bench`` (timings against the
peer, :mod:`rawdelta.bench`) and ``info`` (environment).

``rawdelta check`` runs every registered op on its declared check cases (``OpDef.check_cases``), forward and
backward, on every backend that can run here and that the op has (it lists the ops a backend is not one of), and
compares every output and gradient with the float64 NumPy reference
(:func:`rawdelta.testing.reference.reference_results`) by :mod:`rawdelta.testing.compare`. Without a GPU
the Numba reference kernels run in the Numba CUDA simulator; ``NUMBA_ENABLE_CUDASIM`` is set before Numba is first
imported for that. A new op gets its checks by being registered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import __version__
from ._arrays import cupy_or_none
from .ops import registry
from .ops.common import api
from .ops.common.backend import gpu_unavailable_reason, numba_status
from .ops.common.opdef import CheckCase, OpDef
from .testing.compare import assert_close, error_stats, tolerance
from .testing.inputs import split_op_args, to_device
from .testing.reference import grad_label, reference_results

# ----------------------------------------------------------------------------------------------------------------------
# What `rawdelta check` runs: every op's declared check cases (OpDef.check_cases)
# ----------------------------------------------------------------------------------------------------------------------


def checks() -> list[tuple[OpDef, CheckCase]]:
    """Every registered op's check cases, in registration order."""
    return [(op, case) for op in registry.ops() for case in op.check_cases]


# Input dtypes checked per backend. numpy and numba compute in float64 / float32 whatever the input, so one
# dtype exercises them; the CUDA kernels have a load/store path per dtype.
BACKEND_DTYPES: dict[str, tuple[str, ...]] = {
    "numpy": ("float32",),
    "numba": ("float32",),
    "cuda": ("float32", "float16", "bfloat16"),
}
BACKENDS = tuple(BACKEND_DTYPES)


# ----------------------------------------------------------------------------------------------------------------------
# Where each backend can run
# ----------------------------------------------------------------------------------------------------------------------


def _use_numba_simulator_without_gpu(gpu: bool) -> None:
    """Without a GPU, run the Numba kernels in the CUDA simulator; only effective before numba is imported."""
    if not gpu and "NUMBA_ENABLE_CUDASIM" not in os.environ and "numba" not in sys.modules:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def backend_status(gpu_reason: str | None) -> dict[str, dict[str, Any]]:
    """Per backend: ``{"available": bool, "where": str}`` or ``{"available": False, "reason": str}``."""
    status: dict[str, dict[str, Any]] = {"numpy": {"available": True, "where": "CPU, float64"}}
    numba_reason, numba_mode = numba_status()
    status["numba"] = ({"available": False, "reason": numba_reason} if numba_reason
                       else {"available": True, "where": numba_mode})
    status["cuda"] = ({"available": False, "reason": gpu_reason} if gpu_reason
                      else {"available": True, "where": "GPU"})
    return status


# ----------------------------------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One compared quantity (or one failed run, with ``quantity="(run)"``)."""

    backend: str
    dtype: str
    op: str
    case: str
    quantity: str
    rel_rms: float | None
    max_abs: float | None
    bound: float | None
    passed: bool
    detail: str = ""


def compare(name: str, ref: Any, out: Any, dtype: str) -> tuple[float | None, float | None, float, bool, str]:
    """``(rel-RMS, max-abs, bound, passed, detail)`` of `out` against the float64 `ref` (assert_close's verdict)."""
    bound = tolerance(name, dtype)
    if out is None:
        return None, None, bound, False, f"{name}: the backend returned None"
    try:
        rel, max_abs, _ = error_stats(ref, out)
    except AssertionError as e:  # shape mismatch
        return None, None, bound, False, str(e)
    try:
        assert_close(name, ref, out, bound)
    except AssertionError as e:
        return rel, max_abs, bound, False, str(e)
    return rel, max_abs, bound, True, ""


def _reference(op: OpDef, case: CheckCase, dtype: str, cache: dict[tuple[int, str], Any]) -> tuple[dict[str, Any], Any]:
    """``(inputs, (outputs, gradients) or the exception)``, computed once per case and dtype for every backend."""
    key = (id(case), dtype)
    if key not in cache:
        inputs = op.family.input_generator()(**case.params, dtype=dtype)
        try:
            kw, do, dht = split_op_args(inputs)
            cache[key] = inputs, reference_results(op, {**kw, **case.call}, do, dht if op.has_state else None)
        except Exception as e:
            cache[key] = inputs, e
    return cache[key]


def run_case(op: OpDef, case: CheckCase, backend: str, dtype: str, on_device: bool,
              cache: dict[tuple[int, str], Any]) -> list[Row]:
    row = {"backend": backend, "dtype": dtype, "op": op.name, "case": case.label}
    inputs, ref = _reference(op, case, dtype, cache)
    if isinstance(ref, Exception):
        return [Row(**row, quantity="(reference)", rel_rms=None, max_abs=None, bound=None, passed=False,
                    detail=f"{type(ref).__name__}: {ref}")]
    ref_out, ref_grads = ref
    try:
        args = to_device(inputs) if on_device else inputs
        dkw, ddo, ddht = split_op_args(args)
        # what rawdelta.<op>_fwd / _bwd run, on the declaration itself
        state = {"output_final_state": True} if op.has_state else {}  # the final state is compared too
        outs, residuals = api.forward(op, {**dkw, **state, **case.call, "backend": backend})
        grads = api.backward(residuals, ddo, ddht if op.has_state else None)._asdict()
    except Exception as e:
        return [Row(**row, quantity="(run)", rel_rms=None, max_abs=None, bound=None, passed=False,
                    detail=f"{type(e).__name__}: {e}")]
    got = {spec.name: x for spec, x in zip(op.outputs, outs)}
    pairs = [(n, ref_out[n], got[n]) for n in got]
    pairs += [(grad_label(n), r, grads.get(n)) for n, r in ref_grads.items() if r is not None]
    rows = []
    for name, r, out in pairs:
        rel, max_abs, bound, passed, detail = compare(name, r, out, dtype)
        rows.append(Row(**row, quantity=name, rel_rms=rel, max_abs=max_abs, bound=bound, passed=passed,
                        detail=detail))
    return rows


def ops_without(backend: str) -> list[str]:
    """The registered ops that have no `backend` (whose kernels are not written yet): not checked on it."""
    return [op.name for op in registry.ops() if backend not in op.backends]


def run_checks(backends: Sequence[str], status: dict[str, dict[str, Any]]) -> tuple[list[Row], dict[str, float]]:
    """Every check case of every op (:func:`checks`) on every available backend in `backends` that the op has (see
    :func:`ops_without`); returns rows and seconds per backend."""
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    cache: dict[tuple[int, str], Any] = {}
    for backend in backends:
        if not status[backend]["available"]:
            continue
        on_device = backend == "cuda" or (backend == "numba" and status["numba"]["where"] == "GPU")
        t0 = time.perf_counter()
        for dtype in BACKEND_DTYPES[backend]:
            for op, case in checks():
                if backend in op.backends:
                    rows.extend(run_case(op, case, backend, dtype, on_device, cache))
        seconds[backend] = time.perf_counter() - t0
    return rows, seconds


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "nan" if math.isnan(x) else f"{x:.2e}"


def _json_number(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _print_table(rows: list[Row]) -> None:
    header = ("backend", "dtype", "case", "quantity", "rel-RMS", "max-abs", "bound", "result")
    for op in dict.fromkeys(r.op for r in rows):
        body = [(r.backend, r.dtype, r.case, r.quantity, _fmt(r.rel_rms), _fmt(r.max_abs), _fmt(r.bound),
                 "PASS" if r.passed else "FAIL") for r in rows if r.op == op]
        widths = [max(len(c[i]) for c in (header, *body)) for i in range(len(header))]
        print(f"\n{op}")
        for cells in (header, *body):
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def _check(args: argparse.Namespace) -> int:
    gpu_reason = gpu_unavailable_reason()
    _use_numba_simulator_without_gpu(gpu_reason is None)
    status = backend_status(gpu_reason)
    requested = tuple(dict.fromkeys(args.backend)) if args.backend else BACKENDS
    rows, seconds = run_checks(requested, status)
    missing = [b for b in requested if not status[b]["available"]]
    ok = bool(rows) and all(r.passed for r in rows) and not (args.backend and missing)

    if args.json:
        out = {
            "ok": ok,
            "backends": {b: {**s, **({"seconds": round(seconds[b], 3)} if b in seconds else {}),
                             "ops_without": ops_without(b)}
                         for b, s in status.items()},
            "results": [{**asdict(r), "rel_rms": _json_number(r.rel_rms), "max_abs": _json_number(r.max_abs)}
                        for r in rows],
        }
        print(json.dumps(out, indent=2))
        return 0 if ok else 1

    print(f"rawdelta {__version__} check: forward and gradients against the float64 NumPy reference")
    for b in requested:
        s = status[b]
        if s["available"]:
            print(f"  {b:6s} ran on {s['where']} in {seconds[b]:.1f} s")
        else:
            print(f"  {b:6s} not available: {s['reason']}")
        if ops_without(b):
            print(f"  {b:6s} is not a backend of {', '.join(ops_without(b))} (not checked there)")
    _print_table(rows)
    failed = [r for r in rows if not r.passed]
    if failed:
        print()
    for r in failed:
        print(f"FAIL {r.backend} {r.dtype} {r.op}/{r.case} {r.quantity}: {r.detail}")
    if args.backend and missing:
        print(f"\nrequested backend(s) not available: {', '.join(missing)}")
    if not rows:
        print("\nnothing was checked")
    n_pass = sum(r.passed for r in rows)
    print(f"\n{'PASS' if ok else 'FAIL'}: {n_pass} of {len(rows)} comparisons passed")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------------------
# rawdelta info
# ----------------------------------------------------------------------------------------------------------------------

_DISTRIBUTIONS = ("numpy", "cupy", "numba", "numba-cuda", "torch", "jax")


def _version(dist: str) -> str:
    from .bench.env import version

    return version(dist) or "not installed"


def _gpus() -> list[dict[str, Any]]:
    cp = cupy_or_none()
    if cp is None:
        return []
    gpus = []
    for i in range(cp.cuda.runtime.getDeviceCount()):
        props = cp.cuda.runtime.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        gpus.append({"id": i, "name": name, "compute_capability": f"{props['major']}.{props['minor']}"})
    return gpus


def collect_info() -> dict[str, Any]:
    """Versions, GPUs, CuPy's kernel cache directory, the Numba mode and the number of CUDA instantiations."""
    gpu_reason = gpu_unavailable_reason()
    _use_numba_simulator_without_gpu(gpu_reason is None)
    info: dict[str, Any] = {"rawdelta": __version__, "python": sys.version.split()[0]}
    info.update({d: _version(d) for d in _DISTRIBUTIONS})
    info["gpus"] = _gpus()
    cp = cupy_or_none()
    if cp is not None:
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    info["gpu_reason"] = gpu_reason
    info["cupy_cache_dir"] = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")
    info["jit_env"] = {k: os.environ.get(k, "") for k in ("RAWDELTA_JIT_LINEINFO", "RAWDELTA_JIT_DEBUG")}
    numba_reason, numba_mode = numba_status()
    info["numba_backend"] = f"not available: {numba_reason}" if numba_reason else numba_mode
    try:
        from .cuda import loader
        from .ops.registry import import_kernel_modules

        import_kernel_modules()  # every op registers its instantiations when its CUDA module is imported
        info["cuda_instantiations"] = sum(len(s.name_expressions) for s in loader.registered())
    except Exception as e:  # report, do not crash: info is what one runs when something is broken
        info["cuda_instantiations"] = f"error: {type(e).__name__}: {e}"
    return info


def _info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("rawdelta", "python", *_DISTRIBUTIONS):
        print(f"{key:22s}{info[key]}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"{'GPU ' + str(g['id']):22s}{g['name']} (compute capability {g['compute_capability']})")
        print(f"{'CUDA runtime / driver':22s}{info['cuda_runtime']} / {info['cuda_driver']}")
    else:
        print(f"{'GPU':22s}none ({info['gpu_reason']})")
    print(f"{'numba backend':22s}{info['numba_backend']}")
    print(f"{'CuPy kernel cache':22s}{info['cupy_cache_dir']}")
    print(f"{'JIT flags':22s}" + ", ".join(f"{k}={v or '(unset)'}" for k, v in info["jit_env"].items()))
    print(f"{'CUDA instantiations':22s}{info['cuda_instantiations']}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawdelta", description="rawdelta: linear-attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run every available backend against the float64 reference",
                           description="Forward and gradients of every op on a small problem, on every "
                                       "available backend, compared with the float64 NumPy reference. "
                                       "Exits non-zero on any failure.")
    check.add_argument("--backend", action="append", choices=BACKENDS,
                       help="check only this backend (repeatable); an unavailable one then counts as a failure")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(func=_check)
    info = sub.add_parser("info", help="versions, GPU, kernel cache, registered CUDA instantiations")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_info)
    from .bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rawdelta`` console script.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 when a check fails, 2 for a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # `rawdelta bench` records the command that produced its numbers
    return int(args.func(args))
