"""Every op rawdelta has: the one list of op families, and what is derived from all of them.

Adding a family is importing its package here and adding it to :data:`FAMILIES`; the package exports ``OPS``, its
:class:`~rawdelta.ops.common.opdef.OpDef` declarations, and the public names generated from them (``__all__``).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import gated_delta_rule, gla
from .common.opdef import OpDef

FAMILIES = (gated_delta_rule, gla)


def ops() -> tuple[OpDef, ...]:
    """Every op of every family, in registration order."""
    return tuple(op for family in FAMILIES for op in family.OPS)


def op(name: str) -> OpDef:
    """The op called `name`; KeyError naming the registered ones otherwise."""
    for o in ops():
        if o.name == name:
            return o
    raise KeyError(f"no op {name!r}; registered: {[o.name for o in ops()]}")


def exports() -> dict[str, Any]:
    """Every public name of every family (the ops, their raw pairs, residual and gradient types, references)."""
    out: dict[str, Any] = {}
    for family in FAMILIES:
        out.update({name: getattr(family, name) for name in family.__all__})
    return out


def import_kernel_modules() -> None:
    """Import every op's cuda backend module, so that each has registered its instantiations with the loader
    (which lists only what has been registered: ``rawdelta.cuda.loader.registered``)."""
    for o in ops():
        backend = o.backends.get("cuda")
        if backend is not None:
            importlib.import_module(backend.module)


def input_generators() -> dict[str, Any]:
    """Every family's input generator by its function name (``gated_delta_rule_inputs`` ...)."""
    gens = {}
    for family in dict.fromkeys(o.family for o in ops()):
        fn = family.input_generator()
        gens[fn.__name__] = fn
    return gens
