"""Griffe extension for the API reference: the docstrings' reStructuredText markup, read as Markdown.

The docstrings are Google style with two pieces of reST that Markdown would print as they are:

- Sphinx roles (``:func:`name```, ``:class:`~pkg.Name```, ``:data:`X```, ...). Each becomes
  ``<code>name</code>`` in an optional autorefs link to the object the name resolves to from the
  docstring's scope: a link where that object has a page, plain code where it has none (private helpers,
  other packages), and never a build warning.
- ``text::`` before an indented literal block. The block already renders as code in Markdown; the
  marker becomes ``text:`` (a line holding only ``::`` is dropped).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):`(~?)([\w.]+)`")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$|^\s*::\n", re.M)


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path `target` names from `obj`'s scope (`target` itself when it cannot be resolved)."""
    if target.startswith("."):
        module = obj.module
        dots = len(target) - len(target.lstrip("."))
        base = module.path if module.is_package else module.path.rsplit(".", 1)[0]
        if dots > 1:
            base = base.rsplit(".", dots - 1)[0]
        return f"{base}.{target.lstrip('.')}"
    head, _, rest = target.partition(".")
    for scope in (obj, obj.module):
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            continue
        return f"{path}.{rest}" if rest else path
    return target


def _rewrite(obj: griffe.Object) -> None:
    doc = obj.docstring
    if doc is not None:

        def link(m: re.Match[str]) -> str:
            short, target = m.groups()
            shown = target.lstrip(".").rsplit(".", 1)[-1] if short else target
            return f'<autoref identifier="{_identifier(obj, target)}" optional><code>{shown}</code></autoref>'

        text = _LITERAL_MARKER.sub(lambda m: "" if m.group(0).endswith("\n") else ":", doc.value)
        text = _ROLE.sub(link, text)
        if text != doc.value:
            doc.value = text
            doc.__dict__.pop("parsed", None)  # drop a cached parse of the old text
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member)


class RstMarkup(griffe.Extension):
    """Rewrite the docstrings of a package once it is loaded (the rewrite is idempotent)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _rewrite(pkg)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """The same hook under its griffe 1.x name."""
        _rewrite(pkg)
