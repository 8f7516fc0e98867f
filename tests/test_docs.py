"""The documentation states what the code does: the tolerance table, the site's pages, the README's commands."""

from __future__ import annotations

import re
from pathlib import Path

from rawdelta.testing.compare import MAX_ABS_FACTOR, TOLERANCES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLASSES = ("out", "grad", "gate")


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown page."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_conventions_tolerance_table_matches_code():
    body = section((DOCS / "conventions.md").read_text(), "Tolerances")
    rows = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert [h.split()[0] for h in header[1:]] == list(CLASSES)
    table = {}
    for line in rows[2:]:
        dtype, *bounds = (c.strip() for c in line.strip("|").split("|"))
        for cls, bound in zip(CLASSES, bounds):
            table[(dtype, cls)] = float(bound)
    assert table == TOLERANCES
    assert f"max-abs error is at most `{MAX_ABS_FACTOR:g} × bound × max|ref|`" in body


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages


def test_readme_states_the_gpu_test_command_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert "PYTHONPATH=. python3 -m pytest -m gpu -q" in readme
    assert "(docs/index.md)" in readme


def test_benchmarks_page_has_the_decode_section_and_command():
    body = section((DOCS / "benchmarks.md").read_text(), "Decode (fused_recurrent_gated_delta_rule)")
    assert "PYTHONPATH=. python3 benchmarks/decode_gdn.py" in body
    rows = [line for line in body.splitlines() if line.startswith("| ") and "µs" not in line]
    rawdelta_rows = [r for r in rows if r.startswith("| rawdelta")]
    peer_rows = [r for r in rows if r.startswith("| fla-core")]
    assert rawdelta_rows and peer_rows, "the decode table needs rawdelta and peer rows measured in one run"
    for r in rawdelta_rows + peer_rows:
        assert re.search(r"\| \d+\.\d \| \d\.\d\d \|", r), f"row without a time and x-floor: {r}"
