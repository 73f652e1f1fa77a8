"""Building a (nested) config dataclass: its defaults, then a YAML file, then `key=value` overrides.

All three sources become one nested mapping of updates; `build` applies it to the defaults section by
section, so a section given in YAML or as `data={path: x}` changes only the keys it names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from openmae.config.coerce import CliText, coerce
from openmae.config.fields import (
    ConfigError,
    dotted_keys,
    field_default,
    is_dataclass_instance,
    is_dataclass_type,
    suggest,
    type_hints,
)
from openmae.config.yaml_io import read_yaml, yaml_load

T = TypeVar("T")


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `yaml_path`, then `key=value` overrides.

    Overrides use dotted keys for nested dataclasses (`data.path=/images optim.lr=1e-3`); their values
    are YAML scalars or flow sequences (`1e-4`, `true`, `null`, `[0.2, 1.0]`). Later overrides win
    (the command line allows each key once; see `openmae.config.cli`).
    Raises `ConfigError` on an unknown key, a wrong type or a value `__post_init__` rejects.
    """
    updates = read_yaml(yaml_path) if yaml_path is not None else {}
    for key, value in parse_overrides(overrides):
        _set_dotted(updates, key, value)
    return config_from_dict(cls, updates)


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build `cls` from its defaults updated by the nested mapping `data` (e.g. a saved config)."""
    return build(cls, data, prefix="")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """Split `key=value` strings at the first `=`; values stay text until checked against a field."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        pairs.append((key.strip(), CliText(value.strip())))
    return pairs


def build(cls: type[T], updates: Mapping[str, Any], prefix: str, base: Any = None) -> T:
    """`cls` from `base` (or the field defaults) with `updates` applied, every value type-checked.

    `prefix` is the dotted key of this section (`"data."`), so messages name the full key.
    """
    if not isinstance(updates, Mapping):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or cls.__name__!r} expects a mapping, got {updates!r}"
        )
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in updates:
        if name not in fields:
            key = f"{prefix}{name}"
            raise ConfigError(f"unknown config key {key!r}{suggest(key, dotted_keys(cls, prefix))}")
    kwargs = {}
    for name, field in fields.items():
        key, tp = f"{prefix}{name}", hints[name]
        current = getattr(base, name) if base is not None else field_default(field)
        if name in updates:
            kwargs[name] = _updated(updates[name], tp, key, current)
        elif current is not dataclasses.MISSING:
            kwargs[name] = current
        elif is_dataclass_type(tp):
            kwargs[name] = build(tp, {}, f"{key}.")
        else:
            raise ConfigError(f"config key {key!r} has no default and was not given")
    return _construct(cls, kwargs, prefix)


def _updated(value: Any, tp: Any, key: str, current: Any) -> Any:
    """The field `key`'s new value: a section updates the section's current value rather than replacing it."""
    if is_dataclass_type(tp) and isinstance(value, CliText) and value.lstrip().startswith("{"):
        value = yaml_load(value)  # `data={path: x}`: a flow mapping of section updates
    if is_dataclass_type(tp) and isinstance(value, Mapping):
        return build(tp, value, f"{key}.", current if is_dataclass_instance(current) else None)
    return coerce(value, tp, key)


def _construct(cls: type[T], kwargs: dict, prefix: str) -> T:
    """`cls(**kwargs)`, with the class's own `__post_init__` checks as one-line `ConfigError`s."""
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        where = f"config section {prefix.rstrip('.')!r}" if prefix else cls.__name__
        message = " ".join(str(error).split())
        raise ConfigError(f"invalid {where}: {message}") from error


def nest_dotted(dotted: Mapping[str, Any]) -> dict:
    """`{"data.path": x, "epochs": 2}` -> `{"data": {"path": x}, "epochs": 2}` (for `config_from_dict`)."""
    updates: dict = {}
    for key, value in dotted.items():
        _set_dotted(updates, key, value)
    return updates


def merge_updates(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """Nested updates `extra` laid over `base`: sections merge key by key, other values replace."""
    merged = {key: dict(value) if isinstance(value, Mapping) else value for key, value in base.items()}
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_updates(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(updates: dict, key: str, value: Any) -> None:
    """`updates[a][b][c] = value` for `key = "a.b.c"`, creating (or replacing non-mapping) sections."""
    *sections, leaf = key.split(".")
    node = updates
    for section in sections:
        child = node.get(section)
        if isinstance(child, CliText):  # `data={path: x}` given before `data.path=y`
            child = yaml_load(child) if child else None
        node[section] = dict(child) if isinstance(child, Mapping) else {}
        node = node[section]
    node[leaf] = value
