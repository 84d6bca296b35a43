"""Loading a configuration: a YAML file plus `--set a.b=value` overrides, validated once into a `Config`; errors
phrased for the user (field path, bad value, what is allowed); a folder bound to the config that started it.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import BindingError, Config, ConfigError


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}): {err.error_count()} problem(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(Config, e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            msg = f"unknown field{'; did you mean ' + repr(close[0]) + '?' if close else ''} Allowed here: {allowed}"
            lines.append(f"  - {path}: {msg}")
            continue
        value = e.get("input")
        if isinstance(value, Mapping):  # a whole section failed a cross-field check: the message says why
            lines.append(f"  - {path}: {msg}")
            continue
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {path} = {shown}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in list(candidates):
            candidates.extend(getattr(c, "__args__", ()))
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (['a','b','c'], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted field path like train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {item!r}: {'.'.join(path[: i + 1])} is not an index of a {len(node)}-item list"
                    )
                node = node[int(part)]
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {item!r}: {last!r} is not an index of a {len(node)}-item list")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; pass --config with a YAML file (see configs/)"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(raw: Mapping[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, validate once."""
    raw = read_yaml(path) if path else {}
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    source = (str(path) if path else "defaults") + (" + --set overrides" if overrides else "")
    return validate(raw, source)


def with_updates(cfg: Config, updates: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with dotted-path updates applied and re-validated (used for trials and sub-runs)."""
    raw = cfg.model_dump(mode="json")
    for key, value in updates.items():
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return validate(raw, "derived config")


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`a.b: old → new` for every leaf that differs between two config dumps."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


def bind_config(url: str, cfg: Config, neutral: tuple[str, ...], what: str, fix: str) -> None:
    """Bind a folder to the config that started it (the JSON file at `url`): resuming it under a different
    config would mix two experiments, so that is refused, listing the differences (fields under `neutral` may
    change)."""
    from pipeline.store import storage

    new = cfg.model_dump(mode="json")
    if storage.exists(url):
        old = storage.read_json(url)["config"]
        # Fields added since the folder was started compare as their defaults, not as "missing"; when a field
        # has since been removed or renamed, the stored dump is compared as it is.
        with contextlib.suppress(ValidationError):
            old = type(cfg).model_validate(old).model_dump(mode="json")
        diff = [d for d in config_diff(old, new) if not d.startswith(neutral)]
        if diff:
            raise BindingError(f"{what} was started with a different config ({'; '.join(diff[:6])}). {fix}")
    else:
        storage.write_json(url, {"config": new, "created": time.time()})
