"""How rawdelta's modules may import each other, checked.

- The core never reaches torch or jax: only rawdelta.adapters (and the rawdelta.torch / rawdelta.jax shims) may
  (an import probe in a fresh interpreter, and a text scan).
- A static analysis (``ast``) of every ``rawdelta/**/*.py``, counting imports at any depth: imports go one way
  through :data:`LAYERS`, no modules import each other in a cycle, and no module uses another module's
  private (underscore) name.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import rawdelta

ROOT = "rawdelta"

LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "base": (0, ("rawdelta.errors", "rawdelta._arrays", "rawdelta._validate")),
    "cuda": (1, ("rawdelta.cuda",)),
    "ops": (2, ("rawdelta.ops",)),
    "testing": (3, ("rawdelta.testing",)),
    "adapters": (3, ("rawdelta.adapters",)),
    "facade": (4, ("rawdelta", "rawdelta.torch", "rawdelta.jax")),
    "application": (5, ("rawdelta.cli", "rawdelta.bench", "rawdelta.__main__")),
}
"""Layer name -> (rank, modules), lowest rank first. A module may import modules of its own layer or of a lower
rank, never of a higher one, and never of another layer of the same rank (``testing`` and ``adapters`` are
siblings: the shipped test helpers are not framework glue, and the adapters carry no test code).

Why: each layer can then be read, tested and changed knowing only what lies below it. The kernels and their
loader (``cuda``) know nothing of the host code that launches them; the host code (``ops``) nothing of the
frameworks, the tests or the commands built on it; and ``import rawdelta`` never pulls in the CLI or the
benchmarks. The facade (``rawdelta/__init__.py`` and the ``rawdelta.torch`` / ``rawdelta.jax`` shims)
re-exports the layers below it, so a core module that imports ``rawdelta`` (``from .. import __version__``)
reaches up. ``rawdelta.__main__`` is ``python -m rawdelta``, that is the CLI, so it sits with the application
layer it runs.

A listed name covers that module and its submodules, except ``rawdelta`` itself, which names only
``rawdelta/__init__.py``; a module in no layer is reported, so a new top-level module must be placed here.
"""

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


# ----------------------------------------------------------------------------------------------------------------------
# Static analysis of the package's own imports: layer order, cycles, private names
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One module of the scanned package: dotted name, path as reported, text, and whether it is a package."""

    name: str
    path: str
    text: str
    is_package: bool


@dataclass(frozen=True)
class Import:
    """One import of a package module by a package module.

    ``target`` is the module the statement loads: ``from a import b`` targets ``a.b`` when that is a module and
    ``a`` otherwise. ``type_only`` marks an import under ``if TYPE_CHECKING:``, which never runs.
    """

    source: str
    target: str
    line: int
    statement: str
    type_only: bool


@dataclass(frozen=True)
class Offence:
    """One breach of a rule, at ``path:line``."""

    path: str
    line: int
    module: str
    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}: {self.why}"


@dataclass(frozen=True)
class Scan:
    """Every module of a package, every import between them, and every private name used across modules."""

    modules: dict[str, Source]
    imports: tuple[Import, ...]
    private_uses: tuple[Offence, ...]


def _module_name(rel: PurePosixPath) -> tuple[str, bool]:
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def package_sources(pkg_dir: Path) -> dict[str, Source]:
    """Every ``*.py`` under `pkg_dir`, by dotted module name."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = PurePosixPath(path.relative_to(pkg_dir.parent).as_posix())
        name, is_package = _module_name(rel)
        out[name] = Source(name, str(rel), path.read_text(encoding="utf-8"), is_package)
    return out


def _internal(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner(name: str, known: dict[str, Source]) -> str:
    """The longest prefix of dotted `name` that is a module of the package."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _absolute(src: Source, level: int, module: str | None) -> str | None:
    """The absolute module a (possibly relative) ``from`` names; None when it climbs above the top package."""
    if level == 0:
        return module
    parts = src.name.split(".") if src.is_package else src.name.split(".")[:-1]
    if level - 1 >= len(parts):
        return None
    return ".".join(parts[: len(parts) - (level - 1)] + ([module] if module else []))


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.Call) -> str | None:
    """The constant module name of ``importlib.import_module("...")`` / ``__import__("...")``, else None."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
        value = node.args[0].value
        if isinstance(value, str) and not value.startswith("."):
            return value
    return None


def _scan_module(src: Source, known: dict[str, Source]) -> tuple[list[Import], list[Offence]]:
    tree = ast.parse(src.text, filename=src.path)
    imports: list[Import] = []
    privates: list[Offence] = []
    # local name -> package module bound to it anywhere in the file (``import a.b as m``, ``from a import b``,
    # ``import a.b`` binding ``a``), for the attribute check below. One table per file, not per scope: a local
    # variable that reuses a module's name would be taken for the module, which the code base does not do.
    bound: dict[str, str] = {}

    def statement(node: ast.AST) -> str:
        text = " ".join((ast.get_source_segment(src.text, node) or "").split())
        return text if len(text) <= 100 else text[:97] + "..."

    def private(node: ast.AST, owner: str, name: str, how: str) -> None:
        if owner != src.name:
            privates.append(Offence(src.path, node.lineno, src.name, f"{how} {owner}.{name}",
                                    "a private name of another module (make it public in the module that owns it, "
                                    "or move it to one both can import)"))

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _internal(alias.name):
                    continue
                targets.append(_owner(alias.name, known))
                if alias.asname is None:
                    bound[ROOT] = ROOT
                elif alias.name in known:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(src, node.level, node.module)
            if base is not None and _internal(base):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in known:
                        targets.append(full)
                        bound[alias.asname or alias.name] = full
                    else:
                        targets.append(_owner(base, known))
                        if _private(alias.name):
                            private(node, _owner(base, known), alias.name, "imports")
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)) and _internal(name):
            targets.append(_owner(name, known))
        for target in dict.fromkeys(targets):
            imports.append(Import(src.name, target, node.lineno, statement(node), type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)

    def module_of(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            outer = module_of(expr.value)
            if outer is not None and f"{outer}.{expr.attr}" in known:
                return f"{outer}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = module_of(node.value)
            if owner is not None and f"{owner}.{node.attr}" not in known:
                private(node, owner, node.attr, "uses")
    return imports, privates


def scan(sources: dict[str, Source]) -> Scan:
    """Imports and cross-module private names of every module in `sources`."""
    imports: list[Import] = []
    privates: list[Offence] = []
    for src in sources.values():
        i, p = _scan_module(src, sources)
        imports += i
        privates += p
    # several uses of one name on one line are one offence
    unique = sorted(set(privates), key=lambda o: (o.path, o.line, o.what))
    return Scan(sources, tuple(imports), tuple(unique))


def layer_of(module: str) -> str | None:
    """The layer of :data:`LAYERS` whose longest listed name covers `module`."""
    best: tuple[int, str] | None = None
    for layer, (_, names) in LAYERS.items():
        for n in names:
            covers = module == n or (n != ROOT and module.startswith(n + "."))
            if covers and (best is None or len(n) > best[0]):
                best = (len(n), layer)
    return best[1] if best else None


def layer_offences(s: Scan) -> list[Offence]:
    """Modules in no layer, and imports of a higher layer or of a sibling layer of the same rank."""
    out = [Offence(src.path, 1, name, f"module {name}", "is in no layer of LAYERS (tests/test_layering.py)")
           for name, src in sorted(s.modules.items()) if layer_of(name) is None]
    for imp in s.imports:
        a, b = layer_of(imp.source), layer_of(imp.target)
        if a is None or b is None or a == b or LAYERS[b][0] < LAYERS[a][0]:
            continue
        allowed = [n for n, (rank, _) in LAYERS.items() if rank < LAYERS[a][0] or n == a]
        how = "a sibling layer" if LAYERS[b][0] == LAYERS[a][0] else "a higher layer"
        out.append(Offence(s.modules[imp.source].path, imp.line, imp.source,
                           f"{imp.source} ({a}) imports {imp.target} ({b}) [{imp.statement}]"
                           + (" (type-only)" if imp.type_only else ""),
                           f"{b} is {how}; {a} may import only {', '.join(allowed)}"))
    return sorted(out, key=lambda o: (o.path, o.line))


def import_cycles(s: Scan) -> list[list[str]]:
    """Each set of modules that import one another at run time (a strongly connected component of more than one
    module, or a module importing itself), sorted; ``if TYPE_CHECKING:`` imports do not count."""
    graph: dict[str, set[str]] = {m: set() for m in s.modules}
    for imp in s.imports:
        if not imp.type_only:
            graph[imp.source].add(imp.target)
    # Tarjan's algorithm, iterative so a deep chain of modules cannot hit the recursion limit
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    work: list[tuple[str, Iterator[str]]] = []  # the depth-first path, each module with its unvisited imports

    def enter(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        work.append((v, iter(sorted(graph[v]))))

    for root in sorted(graph):
        if root in index:
            continue
        enter(root)
        while work:
            v, successors = work[-1]
            w = next(successors, None)
            if w is not None:
                if w not in index:
                    enter(w)
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in graph[v]:
                    components.append(sorted(component))
    return sorted(components)


def _shortest_loop(s: Scan, members: list[str]) -> list[str]:
    """One closed path through ``members[0]`` inside the cycle, as an example for the message."""
    inside = set(members)
    edges: dict[str, set[str]] = {}
    for imp in s.imports:
        if not imp.type_only and imp.source in inside and imp.target in inside:
            edges.setdefault(imp.source, set()).add(imp.target)
    start = members[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    return members


def cycle_report(s: Scan, cycle: list[str]) -> str:
    """A cycle, one closed path through it, and every import that makes it up (file:line)."""
    inside = set(cycle)
    lines = [f"cycle of {len(cycle)} module(s): {', '.join(cycle)}",
             f"  e.g. {' -> '.join(_shortest_loop(s, cycle))}"]
    lines += [f"  {s.modules[i.source].path}:{i.line}: {i.source} imports {i.target} [{i.statement}]"
              for i in s.imports if not i.type_only and i.source in inside and i.target in inside]
    return "\n".join(lines)


@functools.cache
def _package_scan() -> Scan:
    return scan(package_sources(PKG))


def test_the_scan_sees_the_package() -> None:
    """Guards the checks below against a blind scan: known modules and known imports are found."""
    s = _package_scan()
    assert {"rawdelta", "rawdelta.cli", "rawdelta.ops.common.backend", "rawdelta.bench.env"} <= set(s.modules)
    edges = {(i.source, i.target) for i in s.imports}
    assert ("rawdelta", "rawdelta.ops.registry") in edges
    assert ("rawdelta.ops.registry", "rawdelta.ops.gated_delta_rule") in edges
    assert ("rawdelta.__main__", "rawdelta.cli") in edges
    assert len(edges) > 50


def test_imports_follow_the_layer_order() -> None:
    offences = layer_offences(_package_scan())
    assert not offences, (f"{len(offences)} import(s) against the layer order (LAYERS in tests/test_layering.py):\n"
                          + "\n".join(map(str, offences)))


def test_no_import_cycles() -> None:
    s = _package_scan()
    cycles = import_cycles(s)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycle_report(s, c) for c in cycles)


def test_no_private_names_across_modules() -> None:
    offences = _package_scan().private_uses
    assert not offences, f"{len(offences)} use(s) of another module's private name:\n" + "\n".join(map(str, offences))


_SYNTHETIC = {
    "rawdelta/__init__.py": "from . import errors\nfrom .ops.fam import f\n__version__ = '0'\n",
    "rawdelta/errors.py": "",
    "rawdelta/_arrays.py": "def public(): ...\n",
    "rawdelta/cuda/__init__.py": "",
    "rawdelta/cuda/loader.py": """
        def users():
            import rawdelta.ops
            from .. import __version__
        """,
    "rawdelta/cuda/tensor_map.py": """
        import importlib
        def f():
            return importlib.import_module("rawdelta.ops.fam")
        """,
    "rawdelta/ops/__init__.py": "",
    "rawdelta/ops/_common.py": "def helper(): ...\n",
    "rawdelta/ops/fam/__init__.py": "from .chunk import f\n",
    "rawdelta/ops/fam/chunk.py": """
        from . import naive
        from .._common import helper
        from .naive import _private
        f = naive._ref
        import rawdelta.ops.fam.naive as nv
        import rawdelta.ops._common
        g = (nv.__name__, nv.public, rawdelta.ops._common.helper, rawdelta.ops.fam.naive._deep, obj._a, self._b)
        """,
    "rawdelta/ops/fam/naive.py": """
        def _private(): ...
        def _ref(): ...
        def later():
            from .recurrent import step
        """,
    "rawdelta/ops/fam/recurrent.py": "from .naive import later as step\n",
    "rawdelta/ops/other/__init__.py": "from .sub import x\n",
    "rawdelta/ops/other/sub.py": "from ..other import y\n",
    "rawdelta/ops/typed.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from ..adapters.torch import T
        """,
    "rawdelta/adapters/__init__.py": "",
    "rawdelta/adapters/torch.py": "from ..ops import typed\nfrom ..testing import helpers\n",
    "rawdelta/testing/__init__.py": "",
    "rawdelta/testing/helpers.py": "from ..ops.fam import f\nfrom .. import _arrays\nz = _arrays.public\n",
    "rawdelta/torch.py": "from rawdelta.adapters.torch import T\n",
    "rawdelta/__main__.py": "from .cli import main\n",
    "rawdelta/cli.py": "from . import __version__\nfrom .bench import env\n",
    "rawdelta/bench/__init__.py": "",
    "rawdelta/bench/env.py": "from .. import __version__\nfrom ..cli import _gpu_reason\n",
    "rawdelta/bench/selfish.py": "from rawdelta.bench.selfish import x\n",
    "rawdelta/stray.py": "",
}
"""A small package with one offence of each kind (and look-alikes that are fine); the line numbers below count
from the first line of each (dedented) text."""


def test_the_checks_catch_synthetic_offences() -> None:
    """Each check finds exactly the planted offences (guards against a blind or over-eager detector)."""
    sources = {}
    for rel, text in _SYNTHETIC.items():
        name, is_package = _module_name(PurePosixPath(rel))
        sources[name] = Source(name, rel, textwrap.dedent(text).lstrip("\n"), is_package)
    s = scan(sources)

    assert {(o.module, o.line) for o in layer_offences(s)} == {
        ("rawdelta.stray", 1),  # in no layer
        ("rawdelta.cuda.loader", 2),  # cuda -> ops, inside a function
        ("rawdelta.cuda.loader", 3),  # cuda -> the facade, through `from .. import __version__`
        ("rawdelta.cuda.tensor_map", 3),  # cuda -> ops, through importlib
        ("rawdelta.ops.typed", 3),  # ops -> adapters, type-only still counts
        ("rawdelta.adapters.torch", 2),  # adapters -> testing, a sibling
    }
    assert import_cycles(s) == [
        ["rawdelta.bench.env", "rawdelta.cli"],  # cli imports bench, bench imports cli
        ["rawdelta.bench.selfish"],  # a self-import
        ["rawdelta.ops.fam.naive", "rawdelta.ops.fam.recurrent"],  # through a function-level import
        ["rawdelta.ops.other", "rawdelta.ops.other.sub"],  # a package and its submodule importing each other
    ]  # not ops.typed <-> adapters.torch (type-only), nor ops.fam -> ops.fam.chunk -> ops.fam.naive (one way)
    assert {(o.module, o.line, o.what) for o in s.private_uses} == {
        ("rawdelta.ops.fam.chunk", 3, "imports rawdelta.ops.fam.naive._private"),
        ("rawdelta.ops.fam.chunk", 4, "uses rawdelta.ops.fam.naive._ref"),
        ("rawdelta.ops.fam.chunk", 7, "uses rawdelta.ops.fam.naive._deep"),
        ("rawdelta.bench.env", 2, "imports rawdelta.cli._gpu_reason"),
    }
    assert "e.g. rawdelta.bench.env -> rawdelta.cli -> rawdelta.bench.env" in cycle_report(s, import_cycles(s)[0])
