"""The configuration reference (docs/configuration.md), generated from the schema: every section and field of
`Config` with its type, default and description, in the schema's own order. It reads the schema and never changes
or validates a config; the text is a pure function of the schema, so a test can tell when the committed file is stale.

    python -m pipeline.config.reference > docs/configuration.md   # or --write; --check exits 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config.schema import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
COMMAND = "python -m pipeline.config.reference --write"
HEADER = f"""# Configuration reference

<!-- Generated from pipeline/config/schema.py by `{COMMAND}`; do not edit by hand. -->

Every stage reads one config: a YAML file (`--config FILE`; the shipped ones are in `configs/`) whose sections are
the ones below, each field optional unless marked *required*, then `--set section.field=value` overrides (the value
is YAML; repeatable). The tree is validated once, on the driver: an unknown field, a value of the wrong type or out
of range is refused with the field's path, the value and what is allowed. Relative paths (`root`, `data.path`,
`teachers[].checkpoint`) are made absolute there. This page is generated from `pipeline/config/schema.py`
(`{COMMAND}`); a test fails when it is out of date.
"""
BOUNDS = [(annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt")]
BOUNDS += [(annotated_types.Le, "≤", "le"), (annotated_types.Lt, "<", "lt")]


def sections(model: type[BaseModel] = Config, path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(path, model) of the tree's sections, depth first in field order: "" is the top level, `teachers[]` the
    items of a list, `tune.space.<key>` the values of a map. A model reached twice is listed where it comes first."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        child = _section_of(field.annotation, f"{path}.{name}" if path else name)
        if child and all(m is not child[1] for _, m in out):
            out += [s for s in sections(child[1], child[0]) if all(m is not s[1] for _, m in out)]
    return out


def fields(model: type[BaseModel] = Config, path: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted path, field) of every field in the tree, in the order of `sections`."""
    for where, section in sections(model, path):
        for name, field in section.model_fields.items():
            yield (f"{where}.{name}" if where else name), field


def render() -> str:
    """The whole reference as Markdown."""
    found = sections()
    links = {model: where for where, model in found}
    parts = [HEADER]
    for where, model in found:
        title = f"`{where}`" if where else "Top level"
        doc = f"\n{' '.join((model.__doc__ or '').split())}\n" if model.__doc__ else ""
        rows = [_row(f"{where}.{n}" if where else n, f, links) for n, f in model.model_fields.items()]
        table = "| field | type | default | description |\n| --- | --- | --- | --- |\n" + "\n".join(rows)
        parts.append(f"## {title}\n{doc}\n{table}\n")
    return "\n".join(parts)


def _section_of(annotation: Any, path: str) -> tuple[str, type[BaseModel]] | None:
    """The section a field's type holds, if any, and its path (`[]` for a list's items, `.<key>` for a map's)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return path, annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    suffix = {list: "[]", dict: ".<key>"}.get(origin, "")
    for arg in args[1:] if origin is dict else args:
        found = _section_of(arg, path + suffix)
        if found:
            return found
    return None


def _row(path: str, field: FieldInfo, links: dict[type, str]) -> str:
    kind = type_text(field.annotation, links) + _bounds(field)
    section = _section_of(field.annotation, path)
    about = field.description or (section[1].__doc__ or "" if section else "")
    cells = [f"`{path}`", kind, default_text(field), _escape(about)]
    return "| " + " | ".join(cells) + " |"


def type_text(annotation: Any, links: dict[type, str]) -> str:
    """A field's type in words: `integer`, `one of "a", "b"`, `list of string`, a link to a section, ..."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        where = links.get(annotation, annotation.__name__)
        return f"[`{where}`](#{_anchor(where)})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}
    if annotation in names:
        return names[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        choices = ", ".join(f"`{value_text(a)}`" for a in args)
        return f"one of {choices}" if len(args) > 1 else choices
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a, links) for a in args)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list of {type_text(args[0], links)}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a, links) for a in args) + "]"
    if origin is dict:
        return f"map of {type_text(args[0], links)} to {type_text(args[1], links)}"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "its section's defaults"
    return f"`{value_text(value)}`"


def value_text(value: Any) -> str:
    """A value as YAML-like text: null, true, 0.05, "fp16", [150, 180, 210]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _bounds(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for kind, sign, attr in BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {value_text(getattr(meta, attr))}")
        if getattr(meta, "pattern", None):
            out.append(f"matching `{meta.pattern}`")
    return (", " + ", ".join(out)) if out else ""


def _anchor(title: str) -> str:
    """GitHub's anchor of a `## \\`title\\`` heading: lower case, punctuation dropped."""
    return "".join(c for c in title.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _escape(text: str) -> str:
    """Prose safe inside a Markdown table cell: no pipes, no HTML tags, no stray emphasis."""
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the configuration reference generated from the schema.")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help=f"write it to {DOC.relative_to(DOC.parents[1])}")
    what.add_argument(
        "--check", action="store_true", help="exit 1 when that file is not the current reference"
    )
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.is_file() and DOC.read_text() == text
        print(f"{DOC}: {'current' if current else f'out of date; run {COMMAND}'}")
        return 0 if current else 1
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
