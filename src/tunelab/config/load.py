"""YAML + ``a.b=c`` overrides -> a validated :class:`TunelabConfig`, or one :class:`ConfigError` naming every problem.

Validation happens here, before any model loads, so a typo costs a second rather than a model download.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import TunelabConfig
from tunelab.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TunelabConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate_config(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, method, train, eval)")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``train.max_steps=50`` -> ("train.max_steps", 50); values are parsed as YAML scalars/lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: Mapping[str, Any]) -> TunelabConfig:
    try:
        return TunelabConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_problem(err) for err in exc.errors()]
        raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(problems))) from None


def describe_problem(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = field_names(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f" (did you mean '{'.'.join(loc[:-1] + hint[:1])}'?)" if hint else ""
        return f"{path}: unknown field{suggestion}; known fields: {', '.join(known)}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        hint = difflib.get_close_matches(str(err["input"]), re.findall(r"'([^']*)'", allowed), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: got {err['input']!r}{suggestion}; allowed values: {allowed}"
    if kind == "value_error":  # a validator's own sentence, which names the fields it is about
        message = str(err["msg"]).removeprefix("Value error, ")
        return f"{path}: {message}" if path else message
    # A union (e.g. bool | str) reports one error per member; the literal branch above covers the useful one.
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def field_names(section_path: list[str]) -> list[str]:
    """The fields of the schema section at ``section_path`` (list indices skipped), for did-you-mean hints."""
    model: type[BaseModel] = TunelabConfig
    for part in section_path:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        model = next((a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return sorted(model.model_fields)


def _flatten(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _flatten(arg)]


def dump_config(config: TunelabConfig, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML that :func:`load_config` reads back."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False), "utf-8")
