"""`rawdelta check` and `rawdelta info`, run as a user runs them (a subprocess), plus the verdict logic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rawdelta import cli
from rawdelta._arrays import cupy_or_none
from rawdelta.ops import registry
from rawdelta.ops.common.opdef import CheckCase, OpDef
from rawdelta.testing import grad_label

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = cupy_or_none() is not None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The CLI must choose the Numba simulator by itself (the test session sets it for its own process).
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "rawdelta", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def table_rows(stdout: str, backend: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith(backend + " ")]


def expected_quantities(op: OpDef, case: CheckCase) -> set[str]:
    """Every output of the op and the gradient of every differentiable input its check case gives."""
    given = op.family.input_generator()(**case.params)
    grads = {grad_label(n) for n in op.differentiable if given.get(n) is not None}
    return {o.name for o in op.outputs} | grads


def test_check_passes_on_every_available_backend():
    proc = run_cli("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for backend in ("numpy", "numba"):
        rows = table_rows(out, backend)
        assert len(rows) == sum(len(expected_quantities(op, case)) for op, case in cli.checks()), out
        assert all(r[-1] == "PASS" for r in rows), out
    if HAS_GPU:
        rows = table_rows(out, "cuda")
        assert {r[1] for r in rows} == {"float32", "float16", "bfloat16"}, out
        assert all(r[-1] == "PASS" for r in rows), out
    else:
        assert "numba  ran on the CUDA simulator" in out
        assert "cuda   not available: " in out
    without = cli.ops_without("cuda")
    if without:
        assert f"cuda   is not a backend of {', '.join(without)} (not checked there)" in out
        if HAS_GPU:
            expected = sum(len(expected_quantities(op, case)) for op, case in cli.checks() if op.name not in without)
            assert len(table_rows(out, "cuda")) == len(cli.BACKEND_DTYPES["cuda"]) * expected, out
    for op, _ in cli.checks():
        assert f"\n{op.name}\n" in out, out
    assert "FAIL" not in out


def test_check_json_lists_every_case_and_quantity():
    proc = run_cli("check", "--backend", "numpy", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert {r["backend"] for r in report["results"]} == {"numpy"}
    got = {(r["op"], r["case"], r["quantity"]) for r in report["results"]}
    assert {op.name for op, _ in cli.checks()} == {op.name for op in registry.ops()}, "an op without check cases"
    for op, case in cli.checks():
        for q in expected_quantities(op, case):
            assert (op.name, case.label, q) in got
    assert all(r["passed"] and r["rel_rms"] <= r["bound"] for r in report["results"])
    for backend, status in report["backends"].items():  # ops without a backend are named, not silently left out
        assert status["ops_without"] == [op.name for op in registry.ops() if backend not in op.backends]


@pytest.mark.skipif(HAS_GPU, reason="cuda is available on this machine")
def test_check_fails_when_a_requested_backend_is_unavailable():
    proc = run_cli("check", "--backend", "cuda")
    assert proc.returncode == 1
    assert "cuda   not available: " in proc.stdout
    assert "requested backend(s) not available: cuda" in proc.stdout


def test_info_runs():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("rawdelta", "numpy", "cupy", "numba", "torch", "jax", "CuPy kernel cache", "CUDA instantiations"):
        assert key in proc.stdout
    if not HAS_GPU:
        assert "GPU                   none" in proc.stdout
    assert "error:" not in proc.stdout


def test_info_json():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["rawdelta"] == "0.1.0"
    assert isinstance(info["cuda_instantiations"], int)
    assert info["cupy_cache_dir"]


def test_compare_verdicts():
    ref = np.linspace(-1.0, 1.0, 64)
    assert cli.compare("o", ref, ref.astype(np.float32), "float32")[3]
    rel, _, bound, passed, detail = cli.compare("o", ref, ref + 1e-3, "float32")
    assert not passed and rel > bound and "relative RMS" in detail
    nan = ref.copy()
    nan[3] = np.nan
    assert not cli.compare("dq", ref, nan, "float32")[3]
    assert not cli.compare("dq", ref, None, "float32")[3]
    assert not cli.compare("dq", ref, ref[:10], "float32")[3]


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--backend", "tpu"])
    assert e.value.code == 2
