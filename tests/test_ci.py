"""The CI script runs exactly what the README tells users to run, and fails when any step fails."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "run"


def quick_start_commands() -> list[str]:
    """The command lines of the first code block under the README's "Quick start" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_install_and_check_then_install_and_test():
    assert quick_start_commands() == [
        "pip install -e . && rawdelta check",
        'pip install -e ".[test]" "torch==2.13.0" && python -m pytest -q',
    ]


def test_ci_runs_the_readme_test_command_verbatim():
    assert quick_start_commands()[1] in CI.read_text()


def test_ci_script_is_strict_bash_and_executable():
    text = CI.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert CI.stat().st_mode & stat.S_IXUSR
    assert "ruff check ." in text and "mkdocs build --strict" in text


def _run_ci_with_fakes(tmp_path: Path, rcs: dict[str, int]) -> tuple[int, list[str]]:
    """Run .ci/run with pip, python, ruff and mkdocs replaced by stubs that log their arguments."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pip", "python", "ruff", "mkdocs"):
        stub = bin_dir / tool
        stub.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{log}"\nexit {rcs.get(tool, 0)}\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(CI)], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines() if log.exists() else []


def test_ci_runs_tests_lint_docs_in_order(tmp_path):
    rc, calls = _run_ci_with_fakes(tmp_path, {})
    assert rc == 0
    assert calls == [
        'pip install -e .[test] torch==2.13.0',
        "python -m pytest -q",
        "ruff check .",
        "mkdocs build --strict",
    ]


@pytest.mark.parametrize(
    "tool, rc",
    [("pip", 1), ("python", 1), ("python", 5), ("ruff", 1), ("mkdocs", 1)],
    ids=["install", "tests", "no-tests-collected", "lint", "docs"],
)
def test_ci_fails_when_any_step_fails(tmp_path, tool, rc):
    status, calls = _run_ci_with_fakes(tmp_path, {tool: rc})
    assert status != 0
    # The later steps still run, so one CI run reports every problem.
    assert calls[-2:] == ["ruff check .", "mkdocs build --strict"]
