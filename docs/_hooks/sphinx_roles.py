"""MkDocs hook: render the Sphinx roles in syncnorm's docstrings as links.

The docstrings use reST roles such as :class:`SyncBatchNorm` and :func:`syncnorm.precise_bn`, which
Markdown renders as the literal text ":class:" followed by the code span. This hook drops the role
and turns the code span into an optional mkdocs-autorefs cross-reference: a link where the object is
in the API reference, plain code where it is not. Bare names are looked up in the ``__all__`` lists
of the public modules, read from the source (no import, so the docs build needs no Lightning).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|exc|data|obj):<code>~?([A-Za-z_][\w.]*)</code>")
_PUBLIC_MODULES = ("syncnorm", "syncnorm.lightning", "syncnorm.inplace_abn", "syncnorm.functional", "syncnorm.testing")
_FULL_NAMES: dict[str, str] = {}


def _read_all(module: str) -> list[str]:
    parts = module.split(".")
    path = Path(__file__).resolve().parents[2].joinpath("src", *parts)
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(element) for element in node.value.elts]
    return []


def on_config(config, **kwargs):
    for module in reversed(_PUBLIC_MODULES):  # the top-level name wins where two modules share one
        for name in _read_all(module):
            _FULL_NAMES[name] = f"{module}.{name}"
    return config


def _link(match: re.Match) -> str:
    name = match[1]
    identifier = name if name.startswith("syncnorm") else _FULL_NAMES.get(name)
    if identifier is None:
        return f"<code>{name}</code>"
    return f'<autoref identifier="{identifier}" optional><code>{name}</code></autoref>'


def on_page_content(html, page, config, files, **kwargs):
    return _ROLE.sub(_link, html)
