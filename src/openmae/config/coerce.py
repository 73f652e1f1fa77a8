"""A value checked and converted against a field's type annotation.

Handles the annotations configs use: `int`, `float`, `bool`, `str`, paths, `Literal[...]`, unions and
`X | None`, `tuple[...]`, `list[...]`, `dict[...]`, and nested dataclasses. Text typed on the command
line (`CliText`) is read as YAML against the type, except where the field takes a string.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from openmae.config.fields import ConfigError, is_dataclass_type, type_name
from openmae.config.yaml_io import yaml_load


class CliText(str):
    """Override text not yet parsed: parsed as YAML against the field's type, kept verbatim for `str`
    fields (so `name=0.10` or `name=off` stay the strings that were typed)."""


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to the annotation `tp`, or `ConfigError` naming `key`."""
    if isinstance(value, CliText):
        return _coerce_text(value, tp, key)
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, tp, key)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _type_error(key, tp, value)
    if origin in (tuple, list) or tp in (tuple, list):
        return _coerce_sequence(value, origin or tp, args, tp, key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        key_tp, value_tp = args or (Any, Any)
        return {coerce(k, key_tp, key): coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            # A section inside a union, list or dict; building it coerces its fields in turn.
            from openmae.config.build import build

            return build(tp, value, f"{key}.")
        raise _type_error(key, tp, value)
    return _coerce_scalar(value, tp, key)


def _coerce_text(value: CliText, tp: Any, key: str) -> Any:
    if tp is str:
        return str(value)
    try:
        parsed = yaml_load(value) if value else None
    except yaml.YAMLError:
        parsed = str(value)
    try:
        return coerce(parsed, tp, key)
    except ConfigError:
        if _accepts_str(tp):  # e.g. `str | None` given `off`: the text, not YAML's bool
            return str(value)
        raise


def _coerce_union(value: Any, args: tuple, tp: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error (e.g. an unknown nested key) is the useful one
        if value is None:
            raise _type_error(key, tp, value)
        try:
            return coerce(value, options[0], key)
        except _TypeMismatch as error:
            if error.key != key:  # an element's mismatch (`mean[1]`) names the element
                raise
            raise _type_error(key, tp, value) from None
    # An option that takes the value as it is wins over one that converts it (`int | str` given "3").
    for option in options:
        if isinstance(option, type) and type(value) is option:
            return value
    for option in options:
        try:
            return coerce(value, option, key)
        except ConfigError:
            continue
    raise _type_error(key, tp, value)


def _coerce_sequence(value: Any, container: type, args: tuple, tp: Any, key: str) -> Any:
    if (
        isinstance(value, str) and "," in value and not value.lstrip().startswith("[")
    ):  # `--data.scale 0.2,1.0` without shell quoting
        value = [CliText(part.strip()) for part in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _type_error(key, tp, value)
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item_tp = args[0] if args else Any
    return container(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if type(value) is int and value in (0, 1):  # `compile=1`
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read `run: 2024` as an int; the field says it is a name
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and issubclass(tp, Path):
            return tp(value)
    raise _type_error(key, tp, value)


_BOOL_WORDS = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(
    ("false", "no", "off", "0"), False
)


class _TypeMismatch(ConfigError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return _TypeMismatch(key, f"config key {key!r} expects {type_name(tp)}, got {value!r}")


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return tp is str
