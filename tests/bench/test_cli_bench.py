"""`rawdelta bench` as a user runs it: a tiny CPU run through the CLI (JSON, plots, docs region), and usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rawdelta import cli
from rawdelta._arrays import cupy_or_none
from rawdelta.bench.report import load, regions, render_region, validate
from rawdelta.ops import registry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(cupy_or_none() is not None, reason="checks the CPU path (a GPU is present)")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "rawdelta", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_tiny_cpu_run_writes_json_plots_and_the_docs_region(tmp_path: Path):
    out, page, plots = tmp_path / "run.json", tmp_path / "page.md", tmp_path / "plots"
    page.write_text("# Page\n\nKept.\n")
    proc = run_cli("--op", "chunk_gated_delta_rule", "--shapes", "1x32x2x16", "--rep-s", "0.02", "--json", str(out),
                   "--plots-dir", str(plots), "--markdown", str(page))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU" in proc.stderr and "running the numpy backend at small shapes" in proc.stderr
    doc = load(out)
    assert doc["device"]["kind"] == "cpu"
    assert doc["command"] == ("rawdelta bench --op chunk_gated_delta_rule --shapes 1x32x2x16 --rep-s 0.02 --json "
                              f"{out} --plots-dir {plots} --markdown {page}")
    got = {(r["mode"], r["impl"]): r for r in doc["results"]}
    assert set(got) == {(m, i) for m in ("forward", "forward+backward") for i in ("numpy", "sdpa")}
    for r in got.values():
        assert r["status"] == "ok" and r["gate"]["passed"] and r["reps"] >= 3 and r["time_s"] > 0
        assert r["shape"] == [1, 32, 2, 16] and r["floor_fraction"] > 0
    assert set(got[("forward+backward", "numpy")]["gate"]["errors"]) == {"o", "dq", "dk", "dv", "dg", "dbeta"}
    assert set(got[("forward+backward", "sdpa")]["gate"]["errors"]) == {"o", "dq"}
    assert got[("forward", "numpy")]["peak_bytes"] > 0
    for name in ("cuda", "numba", "fla"):
        assert doc["implementations"][name]["available"] is False and doc["implementations"][name]["reason"]
    [cold] = doc["cold_start"]
    assert (cold["op"], cold["mode"], cold["impl"], cold["status"], cold["cold"]) == (
        "chunk_gated_delta_rule", "forward", "numpy", "ok", True)
    assert cold["first_result_s"] > 0
    assert sorted(p.name for p in plots.iterdir()) == ["run-chunk_gated_delta_rule-speedup.png",
                                                      "run-chunk_gated_delta_rule-time.png"]
    [(json_rel, plots_rel, region)] = regions(page.read_text())
    assert (json_rel, plots_rel) == ("run.json", "plots")
    assert region == render_region(doc, json_rel, plots_rel)
    assert page.read_text().startswith("# Page\n\nKept.\n")
    assert "chunk_gated_delta_rule, forward+backward" in proc.stdout


def test_json_to_stdout_for_decode():
    proc = run_cli("--mode", "decode", "--shapes", "4x1x2x16", "--rep-s", "0.02", "--cold-start", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert validate(doc) == []
    rows = {r["op"]: r for r in doc["results"]}
    assert len(rows) == len(doc["results"])
    assert set(rows) == {op.name for op in registry.ops() if op.bench and "decode" in op.bench.modes}
    assert "fused_recurrent_gated_delta_rule" in rows
    for r in rows.values():
        assert (r["mode"], r["impl"], r["status"]) == ("decode", "numpy", "ok")
        assert set(r["gate"]["errors"]) == {"o", "final_state"}
    assert doc["cold_start"] == []


@pytest.mark.parametrize("args", [
    ["--shapes", "8x2048"],
    ["--markdown", "page.md"],
    ["--mode", "decode", "--shapes", "1x32x2x16"],
])
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]):
    assert cli.main(["bench", *args]) == 2
    assert "rawdelta bench:" in capsys.readouterr().err


def test_unknown_choices_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--impl", "tpu"])
    assert e.value.code == 2


def test_validate_names_what_is_wrong():
    doc = load(ROOT / "docs" / "bench" / "cpu.json")
    doc["results"][0]["time_s"] = None
    doc["results"][1]["status"] = "fast"
    del doc["results"][2]["gate"]
    problems = validate(doc)
    assert "results[0]: status ok without a time" in problems
    assert any(p.startswith("results[1].status: 'fast'") for p in problems)
    assert "results[2].gate: missing" in problems
    assert validate({"schema": 1}) and validate({**doc, "schema": 2}) == ["schema: expected 1, got 2"] + problems


def test_list_runs_nothing(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "chunk_gated_delta_rule: forward, forward+backward" in out
    assert "numpy  rawdelta numpy (float64): available (default here)" in out
