"""The core never reaches torch or jax: only rawdelta.adapters (and the rawdelta.torch / rawdelta.jax shims) may."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import rawdelta

PKG = Path(rawdelta.__file__).resolve().parent
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax")
CORE_DIRS = ("ops", "cuda")

# Runs in a fresh interpreter: a meta-path finder records and refuses every framework import, then every
# module of the core is imported. A module that catches the ImportError is still caught by the record.
_PROBE = r"""
import importlib, json, pkgutil, sys

BLOCKED = set(sys.argv[1].split(","))
attempts, failures = [], {}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked by tests/test_layering.py")
        return None

sys.meta_path.insert(0, Blocker())

import rawdelta
import rawdelta.adapters
names = ["rawdelta", "rawdelta.adapters"]
for extra in filter(None, sys.argv[2].split(",")):
    try:
        importlib.import_module(extra)
    except ImportError:
        pass
for sub in ("ops", "cuda"):
    pkg = importlib.import_module("rawdelta." + sub)
    names.append(pkg.__name__)
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=lambda n: None):
        names.append(mod.name)
        try:
            importlib.import_module(mod.name)
        except Exception as e:
            failures[mod.name] = f"{type(e).__name__}: {e}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"imported": names, "attempts": attempts, "loaded": loaded, "failures": failures}))
"""

_IMPORT_RE = re.compile(rf"^\s*(?:import|from)\s+({'|'.join(FRAMEWORKS)})(?:\.|\s|$)", re.MULTILINE)


def _probe(*extra_modules: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(FRAMEWORKS), ",".join(extra_modules)],
                          capture_output=True, text=True, cwd=PKG.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_modules_never_import_frameworks() -> None:
    report = _probe()
    assert not report["attempts"], f"a framework import is reachable from the core: {report['attempts']}"
    assert not report["loaded"], f"framework modules loaded by the core: {report['loaded']}"
    framework_failures = {m: e for m, e in report["failures"].items() if any(f in e for f in FRAMEWORKS)}
    assert not framework_failures, framework_failures
    assert any(n.startswith("rawdelta.ops.") for n in report["imported"])
    assert any(n.startswith("rawdelta.cuda.") for n in report["imported"])


def test_probe_detects_a_framework_import() -> None:
    """The adapters do import torch, so the probe must see that attempt (guards against a blind probe)."""
    report = _probe("rawdelta.torch")
    assert "torch" in report["attempts"]


def test_core_sources_have_no_framework_imports() -> None:
    offenders = []
    for sub in CORE_DIRS:
        for path in sorted((PKG / sub).rglob("*.py")):
            for m in _IMPORT_RE.finditer(path.read_text(encoding="utf-8")):
                line = path.read_text(encoding="utf-8")[: m.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(PKG.parent)}:{line}: {m.group(0).strip()}")
    assert not offenders, "framework imports in the core:\n" + "\n".join(offenders)


def test_scan_pattern_catches_imports() -> None:
    """The static scan's pattern matches the import forms it must catch and nothing else."""
    hits = ["import torch", "from torch import Tensor", "import jax.numpy as jnp", "  from jax.experimental import x",
            "import jaxlib"]
    misses = ["import torchvision_like_name_is_fine", "# mentions torch in a comment", "x = 'import torch'",
              "from .torch_utils import y"]
    for s in hits:
        assert _IMPORT_RE.search(s), s
    for s in misses:
        assert not _IMPORT_RE.search(s), s
