"""docs/benchmarks.md: the generated regions are exactly what the generator makes from the committed JSON (so no
number can be edited by hand), the plots they show exist, and regenerating leaves the hand-written text alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rawdelta import cli
from rawdelta.bench.report import load, plot_files, regions, render_region, update_markdown

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
CPU_JSON = ROOT / "docs" / "bench" / "cpu.json"
REGENERATE = "rawdelta bench --report docs/bench/<name>.json --plots-dir docs/bench --markdown docs/benchmarks.md"


def test_every_generated_region_matches_its_committed_json():
    found = regions(PAGE.read_text())
    assert found, "docs/benchmarks.md has no generated region"
    assert "bench/cpu.json" in [j for j, _, _ in found]
    for json_rel, plots_rel, region in found:
        doc = load(PAGE.parent / json_rel)
        assert region == render_region(doc, json_rel, plots_rel), (
            f"the region of {json_rel} differs from its JSON; regenerate it with: {REGENERATE}")
        for _, _, fname, _ in plot_files(doc, Path(json_rel).stem):
            assert (PAGE.parent / plots_rel / fname).is_file(), f"missing plot {fname}"


def test_the_committed_cpu_run_passed_its_gates():
    doc = load(CPU_JSON)
    assert doc["device"]["kind"] == "cpu"
    assert doc["command"].startswith("rawdelta bench ")
    ran = [r for r in doc["results"] if r["impl"] == "numpy"]
    assert {(r["op"], r["mode"]) for r in ran} == {
        ("chunk_gated_delta_rule", "forward"), ("chunk_gated_delta_rule", "forward+backward"),
        ("fused_recurrent_gated_delta_rule", "forward"), ("fused_recurrent_gated_delta_rule", "forward+backward"),
        ("fused_recurrent_gated_delta_rule", "decode")}
    assert all(r["status"] == "ok" and r["gate"]["passed"] for r in ran)
    assert not doc["implementations"]["fla"]["available"] and doc["implementations"]["fla"]["reason"]


def test_regenerating_rewrites_only_the_region(tmp_path: Path):
    shutil.copy(CPU_JSON, tmp_path / "cpu.json")
    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\nHand-written analysis.\n")
    region = update_markdown(page, tmp_path / "cpu.json", tmp_path)
    first = page.read_text()
    assert first.startswith("# Benchmarks\n\nHand-written analysis.\n\n<!-- rawdelta-bench:begin cpu.json plots=. -->")
    page.write_text(first.replace("Hand-written analysis.", "Hand-written analysis, edited.") + "\nTail text.\n")
    update_markdown(page, tmp_path / "cpu.json", tmp_path)
    second = page.read_text()
    assert "Hand-written analysis, edited." in second and second.endswith("\nTail text.\n")
    assert second.count(region) == 1

    doc = json.loads((tmp_path / "cpu.json").read_text())
    doc["device"]["name"] = "Another device"
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    update_markdown(page, tmp_path / "gpu.json", tmp_path)
    third = page.read_text()
    assert [j for j, _, _ in regions(third)] == ["gpu.json", "cpu.json"], "a new region goes before the older ones"
    assert "### Another device" in third and second.replace(region, "") in third.replace(region, "").replace(
        regions(third)[0][2] + "\n\n", "")


def test_plots_are_made_from_the_json_alone(tmp_path: Path):
    assert cli.main(["bench", "--plot-from", str(CPU_JSON), "--plots-dir", str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(f for _, _, f, _ in plot_files(load(CPU_JSON), "cpu"))
    for name in made:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
