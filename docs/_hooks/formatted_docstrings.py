"""Griffe extension: read a class docstring built as ``__doc__ = TEMPLATE.format(...)``.

syncnorm's SyncInstanceNorm1d/2d/3d share one docstring template, filled in with their number of
dimensions. Griffe reads source statically and sees no docstring there, so the API reference would
show those classes bare. This extension evaluates the template (a string constant of the same
module) with the literal keyword arguments of the ``format`` call.
"""

from __future__ import annotations

import ast
import inspect

from griffe import Docstring, Extension


def _formatted_doc(node: ast.ClassDef) -> tuple[str, dict, int] | None:
    for statement in node.body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
            continue
        target, value = statement.targets[0], statement.value
        if not (isinstance(target, ast.Name) and target.id == "__doc__" and isinstance(value, ast.Call)):
            continue
        function = value.func
        if isinstance(function, ast.Attribute) and function.attr == "format" and isinstance(function.value, ast.Name):
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in value.keywords}
            return function.value.id, keywords, statement.lineno
    return None


class FormattedDocstrings(Extension):
    def on_class_instance(self, *, node, cls, agent, **kwargs) -> None:
        if cls.docstring is not None or not isinstance(node, ast.ClassDef):
            return
        found = _formatted_doc(node)
        if found is None:
            return
        template_name, keywords, lineno = found
        template = cls.module.members.get(template_name)
        if template is None or template.value is None:
            return
        text = inspect.cleandoc(ast.literal_eval(str(template.value)).format(**keywords))
        cls.docstring = Docstring(
            text, lineno=lineno, parent=cls, parser=agent.docstring_parser, parser_options=agent.docstring_options
        )
