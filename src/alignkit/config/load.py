"""Resolving a recipe: YAML layers and dotted overrides, coerced to the schema's types.

A recipe is the schema's defaults, then each layer in order (a workflow's shared
sections, a stage's own, a YAML file), then command-line overrides
(`--train.learning_rate 1e-5` or `train.learning_rate=1e-5`), each value coerced to
its field's type. Unknown keys are errors naming the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from alignkit import rundir
from alignkit.config.schema import Recipe
from alignkit.errors import AlignkitError

# ---------------------------------------------------------------- building from dicts


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every settable dotted key of a dataclass tree, with its type and field."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, key + "."))
        else:
            out[key] = (tp, f)
    return out


def _unknown_key_error(key: str, valid: list[str], where: str) -> AlignkitError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return AlignkitError(
        f"Unknown config key '{key}'{where}.{hint} Valid keys: {', '.join(sorted(valid))}."
    )


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or explain why not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (
            isinstance(value, str) and value.lower() in {"null", "none", "~", ""}
        )
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise AlignkitError(
                f"'{key}' must be one of {', '.join(map(str, args))}; got '{value}'."
            )
        return value
    if origin is list:
        return _coerce_list(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            return tp.from_string(value)
        if not isinstance(value, dict):
            raise AlignkitError(f"'{key}' must be a mapping; got {value!r}.")
        return build(tp, value, prefix=key + ".")
    return _coerce_scalar(value, tp, key)


def _coerce_list(value: Any, item_tp: Any, key: str) -> list:
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip().startswith("[") else None
        value = (
            parsed
            if isinstance(parsed, list)
            else [v.strip() for v in value.split(",") if v.strip()]
        )
    if not isinstance(value, list):
        value = [value]
    return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise AlignkitError(f"'{key}' must be true or false; got '{value}'.")
    if tp in (int, float):
        try:
            number = float(value) if tp is float else int(str(value), 0)
        except (TypeError, ValueError):
            raise AlignkitError(
                f"'{key}' must be a{'n integer' if tp is int else ' number'}; got '{value}'."
            ) from None
        if tp is float and not math.isfinite(number):
            raise AlignkitError(f"'{key}' must be a finite number; got '{value}'.")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise AlignkitError(f"'{key}' must be a string; got {value!r}.")
        return str(value)
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "", where: str = "") -> Any:
    """Build a dataclass from a nested dict, coercing types and rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in (data or {}).items():
        if name not in names:
            valid = [prefix + k for k in leaf_fields(cls)] + [prefix + n for n in names]
            raise _unknown_key_error(prefix + str(name), sorted(set(valid)), where)
        kwargs[name] = coerce(value, hints[name], prefix + name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise AlignkitError(
            f"Missing required key(s) {', '.join(prefix + m for m in missing)}{where}."
        )
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Turn `--a.b 1`, `--a.b=1` and `a.b=1` tokens into (key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                key, value = body, tokens[i + 1]
                i += 1
            else:
                key, value = body, "true"
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise AlignkitError(
                f"Unexpected argument '{token}'. Overrides look like --section.key VALUE or section.key=VALUE."
            )
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def apply_overrides(
    data: dict[str, Any], overrides: list[tuple[str, Any]], cls: type = Recipe
) -> dict[str, Any]:
    """Return a copy of a nested recipe dict with dotted overrides set (keys validated)."""
    valid = leaf_fields(cls)
    out = _deep_copy(data)
    for key, value in overrides:
        if key not in valid:
            raise _unknown_key_error(key, list(valid), " on the command line")
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AlignkitError(f"Cannot set '{key}': '{part}' is not a section.")
        node[last] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(data)) if data else {}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"Recipe file '{path}' does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AlignkitError(f"Recipe file '{path}' is not UTF-8 text: is it a YAML file?") from None
    except yaml.YAMLError as exc:
        raise AlignkitError(f"Recipe file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignkitError(
            f"Recipe file '{path}' must hold a mapping of sections at the top level."
        )
    return data


def resolve_recipe(
    layers: Sequence[dict[str, Any]],
    overrides: Sequence[tuple[str, Any]] = (),
    where: str = "",
) -> Recipe:
    """The schema's defaults, then each layer in order (mappings merged key by key, later
    layers winning), then dotted overrides; every key checked against the schema."""
    data: dict[str, Any] = {}
    for layer in layers:
        check_keys(layer, Recipe, where=where)
        data = _merge(data, layer)
    return build(Recipe, apply_overrides(data, list(overrides)), where=where)


def load_recipe(
    path: str | Path | None = None, overrides: Sequence[tuple[str, Any]] = ()
) -> Recipe:
    """Resolve a recipe: defaults, then the YAML file, then overrides."""
    where = f" in '{path}'" if path else ""
    return resolve_recipe([read_yaml(path)] if path else [], overrides, where)


def check_keys(data: dict[str, Any], cls: type, prefix: str = "", where: str = "") -> None:
    """Reject a key that is no field of the schema, naming the closest valid key."""
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(prefix + str(key), list(leaf_fields(Recipe)), where)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            check_keys(value, hints[key], f"{prefix}{key}.", where)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_recipe(cfg: Any, directory: str | Path) -> Path:
    """Write the resolved config beside a run's outputs."""
    return rundir.write_text(Path(directory) / rundir.CONFIG, dump_yaml(cfg))


def field_help(key: str, cls: type = Recipe) -> str:
    tp, f = leaf_fields(cls)[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} (default: {default!r})"


def help_text(cls: type = Recipe, sections: list[str] | None = None) -> str:
    """The `--help` epilog listing every config key with its help."""
    lines = ["config keys (set in the recipe YAML or as --section.key VALUE):"]
    for key in leaf_fields(cls):
        if sections and key.split(".")[0] not in sections:
            continue
        lines.append(f"  --{key}\n      {field_help(key, cls)}")
    return "\n".join(lines)
