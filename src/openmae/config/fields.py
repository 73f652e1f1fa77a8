"""What the other config modules share: the error type, walking a dataclass's fields, names in messages."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union

from openmae.errors import UsageError


class ConfigError(UsageError):
    """An unknown config key, a value of the wrong type, or a value the config's own checks reject."""


def type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as error:  # `from __future__ import annotations` + a class defined in a function
        raise TypeError(f"cannot resolve the field types of {cls.__name__}: {error}") from error


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def field_default(field: dataclasses.Field) -> Any:
    """The field's default (a fresh one from its factory), or `dataclasses.MISSING`."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def leaf_fields(
    cls: type, prefix: str = "", defaults: Any = None
) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """`(dotted key, field, type, default)` for every non-dataclass field, nested sections expanded.

    A section's default comes from its own field (e.g. a `default_factory` that changes one value),
    not from the section class's defaults.
    """
    hints = type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp = f"{prefix}{field.name}", hints[field.name]
        default = getattr(defaults, field.name) if defaults is not None else field_default(field)
        if is_dataclass_type(tp):
            yield from leaf_fields(tp, f"{key}.", default if is_dataclass_instance(default) else None)
        else:
            yield key, field, tp, default


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key under `cls` (sections and leaves), for suggesting the one that was meant."""
    keys = []
    hints = type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            keys.append(f"{prefix}{field.name}")
            if is_dataclass_type(hints[field.name]):
                keys += dotted_keys(hints[field.name], f"{prefix}{field.name}.")
    return keys


def suggest(key: str, candidates: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest candidate, or an empty string when none is close."""
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not matches:  # `weight_decay` for `optim.weight_decay`: compare the last parts as well
        last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        matches = [
            last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.8)
        ]
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def plain(value: Any) -> Any:
    """`value` as nested dicts, lists and scalars that YAML and JSON can store (paths as strings)."""
    if is_dataclass_instance(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def type_name(tp: Any) -> str:
    """An annotation as messages and --help show it: `float | None`, `tuple[int, int]`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))
