"""The documentation tells the truth about the code: README.md and docs/ link only to what exists, name only config
fields, tests, stages and flags that exist, and the configuration reference is the schema's current one. Plus the
house rules (benchmarks/house.py): functions in pipeline/ stay short, camkd/ never imports pipeline/ or Ray.

No Ray, no training: these read text and the schema, in seconds.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from pipeline.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
PAGES = [README, *DOCS, REPO / "cluster" / "README.md"]
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest'
FILE_SUFFIXES = {"pt", "pt2", "onnx", "json", "md", "png", "yaml", "yml", "csv", "py", "sh", "txt", "parquet"}


def _house() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("house", REPO / "benchmarks" / "house.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings inside them are not links or headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", _prose(page.read_text()), flags=re.M):
        slug = _slug(m.group(1))
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    for m in re.finditer(r'<a (?:name|id)="([^"]+)"', page.read_text()):
        out.add(m.group(1))
    return out


def test_the_readme_is_a_product_page_with_the_ci_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it ≤ 300 and move detail into docs/"
    assert TEST_COMMAND in lines, "README.md must keep the test command line exactly: .ci/run copies it"
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading with that anchor)")
    assert not broken, "links that do not resolve:\n" + "\n".join(broken)


def _field_exists(path: str) -> bool:
    """Whether a dotted config path (`train.epochs`, `teachers[].train.epochs`, `tune.space.<key>`) is in Config."""
    model: type[BaseModel] | None = Config
    parts = [p for p in path.replace("[]", "").split(".") if not p.isdigit()]
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is dict:
            return True  # the keys of a map (tune.space's config paths) are the user's
        model = _model_in(annotation)
        if model is None and i < len(parts) - 1:
            return False
    return True


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _named_fields(text: str) -> set[str]:
    """Config paths a page names: `section.field` in backticks (optionally followed by `: value`, `=value` or
    `/other`), and the keys of `--set key=value` anywhere. Calls (`ray.put()`) and file names are not fields."""
    sections = "|".join(Config.model_fields)
    path_re = rf"((?:{sections})(?:\[\])?(?:\.[a-z0-9_]+)+)"
    named = set()
    for span in re.findall(r"`([^`\n]+)`", _prose(text)):
        m = re.match(path_re + r"(?=$|[:= /,])", span)
        if m and m.group(1).rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            named.add(m.group(1))
    named |= set(re.findall(r"--set " + path_re + "=", text))
    return named


def test_every_config_field_the_docs_name_exists():
    unknown = [
        f"{page.relative_to(REPO)}: `{name}`"
        for page in PAGES
        for name in sorted(_named_fields(page.read_text()))
        if not _field_exists(name)
    ]
    assert not unknown, "config fields that pipeline/config/schema.py does not have:\n" + "\n".join(unknown)


def test_the_field_check_can_tell_a_field_from_a_typo():
    assert _named_fields("`train.epochs`, `teachers[].train.epochs: 3`, `student.pt`, `ray.put()`") == {
        "train.epochs",
        "teachers[].train.epochs",
    }
    assert _field_exists("teachers[].checkpoint") and _field_exists("tune.space.strategy.beta")
    assert not _field_exists("train.epoch") and not _field_exists("cache.topk.k")


def test_every_test_the_docs_name_exists():
    defined = {
        p.name: {n.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)}
        for p in (REPO / "tests").glob("test_*.py")
    }
    missing = []
    for page in PAGES:
        last = None
        for m in re.finditer(r"`(?:tests/)?(test_\w+\.py)?(?:::(\w+)…?)?`", page.read_text()):
            file, name = m.group(1), m.group(2)
            if not (file or name):
                continue
            last = file or last
            if last not in defined:
                missing.append(f"{page.relative_to(REPO)}: {last} (no such test file)")
            elif name and not any(t == name or t.startswith(name) for t in defined[last]):
                missing.append(f"{page.relative_to(REPO)}: {last}::{name}")
    assert not missing, "tests the docs name that do not exist:\n" + "\n".join(missing)


def test_every_stage_and_flag_the_docs_name_exists():
    from pipeline.run import build_parser

    parser = build_parser()
    stages = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    wrong = []
    for page in PAGES:
        text = page.read_text()
        # A command line `pipeline/run.py <stage> <flags>`, or a row of a table of stages: | `<stage>` | ... |
        lines = re.finditer(r"(?:pipeline/run\.py|\bcamkd) ([a-z][a-z-]*)([^\n`\"&|;#)]*)", text)
        rows = re.finditer(r"^\| `([a-z][a-z-]*)(?: [A-Z]+)?` \|(.*)$", text, flags=re.M)
        for m in [*lines, *(r for r in rows if r.group(1) in stages)]:
            stage, rest = m.group(1), m.group(2)
            if stage not in stages:
                if "pipeline/run.py" in m.group(0):
                    wrong.append(f"{page.relative_to(REPO)}: unknown stage {stage!r}")
                continue
            flags = {f for a in stages[stage]._actions for f in a.option_strings}
            wrong += [
                f"{page.relative_to(REPO)}: `{stage} {flag}` is not a flag of that stage"
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
                if flag not in flags
            ]
    assert not wrong, "\n".join(wrong)


def test_the_configuration_reference_is_current():
    from pipeline.config import reference

    committed = REPO / "docs" / "configuration.md"
    assert committed.is_file(), (
        "docs/configuration.md is missing: python -m pipeline.config.reference --write"
    )
    assert committed.read_text() == reference.render(), (
        "docs/configuration.md is not the schema's current reference: python -m pipeline.config.reference --write"
    )


def test_the_reference_lists_every_field_with_its_type_and_default():
    from pipeline.config import reference

    text = reference.render()
    for section, field, default in [
        ("train", "epochs", "`240`"),
        ("scaling", "reader", '`"ray_data"`'),
        ("teachers[]", "checkpoint", "`null`"),
    ]:
        anchor = _slug(section)
        assert anchor in _anchors_of(text), section
        path = f"{section}.{field}"
        row = next(line for line in text.splitlines() if line.startswith(f"| `{path}` |"))
        assert default in row, row


def _anchors_of(text: str) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_config_descriptions_say_what_a_field_does_not_what_a_benchmark_measured():
    from pipeline.config import reference

    measured = re.compile(r"\d\s*(ms|µs|GB/s|MB/s|samples/s)\b|\d×|\bmeasured\b|\bbenchmark")
    found = [
        f"{where}: {field.description}"
        for where, field in reference.fields(Config)
        if field.description and measured.search(field.description)
    ]
    assert not found, "measurements belong in docs/performance.md, not in descriptions:\n" + "\n".join(found)


def test_every_performance_section_has_its_date_machine_and_command():
    text = _prose((REPO / "docs" / "performance.md").read_text())
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"\*\*Date\*\*: 20\d\d-\d\d-\d\d", section), f"## {title}: no **Date**: YYYY-MM-DD"
        assert "**Machine**:" in section, f"## {title}: no **Machine**:"
        assert "**Command**:" in section, f"## {title}: no **Command**:"


def test_the_architecture_lists_every_pipeline_module_and_only_those():
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    listed = set(re.findall(r"`(pipeline/[\w/]+\.py)`", text))
    assert not modules - listed, (
        f"docs/architecture.md does not list {sorted(modules - listed)}: add a line each"
    )
    assert not listed - modules, (
        f"docs/architecture.md lists modules that do not exist: {sorted(listed - modules)}"
    )


def test_camkd_imports_nothing_from_pipeline_or_ray():
    assert _house().forbidden_imports() == []


def test_no_function_in_pipeline_is_over_60_lines():
    long = _house().long_functions(limit=60)
    assert not long, f"{len(long)} functions over 60 lines:\n" + "\n".join(f"{n} {w}" for n, w in long)
