"""docs/recipe.md, generated from the recipe models of the installed stages, so that the reference
never drifts from the code: `make docs` (python -m wit_builder.recipe_doc docs/recipe.md)."""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import Section, recipe_model

HEADER = """# Recipe reference

Generated from the code by `make docs`; a test fails when this file is stale. A recipe is one TOML
file; every key is optional but `run.name` (and a field that says *required*). A misspelt key is an
error that lists the section's keys. Paths are relative to the recipe's folder; an `s3://` URL is
read from the store. Sections of stages from other packages appear here once they are installed.
"""


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(a table, below)"
    if value is None:
        return "(absent)"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    text = json.dumps(value, ensure_ascii=False)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def type_text(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_text(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return type_text(args[0])
    return getattr(annotation, "__name__", str(annotation))


def limits(field) -> str:
    found = []
    for m in field.metadata:
        for name, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, name, None) is not None:
                found.append(f"{sign} {getattr(m, name)}")
        if getattr(m, "pattern", None):
            found.append(f"matches `{m.pattern}`")
    return f" ({', '.join(found)})" if found else ""


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def section_doc(title: str, model: type[Section]) -> list[str]:
    lines = [f"## `{title}`", ""]
    if model.__doc__ and model.__doc__ is not Section.__doc__:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for key, field in model.model_fields.items():
        if field.exclude:
            continue
        lines.append(f"| `{key}` | {type_text(field.annotation)}{limits(field)} | {default_text(field)} "
                     f"| {cell(field.description or '')} |")
        inner = [t for t in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, Section)]
        if inner:
            many = typing.get_origin(field.annotation) is list
            nested.append((f"[{title.strip('[]')}.{key}]" if many else f"{title.strip('[]')}.{key}", inner[0]))
    lines.append("")
    for name, inner in nested:
        lines += section_doc(f"[{name}]", inner)
    return lines


def render() -> str:
    lines = [HEADER]
    for name, field in recipe_model().model_fields.items():
        models = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, Section)]
        if models:
            lines += section_doc(f"[{name}]", models[0])
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
