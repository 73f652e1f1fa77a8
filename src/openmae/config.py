"""Run configuration: dataclass defaults, then a YAML file, then `key=value` overrides.

Every run is described by (nested) dataclasses whose fields carry `metadata={"help": ...}`. This module
works for any such dataclass:

    cfg = load_config(PretrainConfig, "configs/demo.yaml", ["epochs=2", "data.path=/images"])

YAML files hold only the differences from the defaults (`diff_from_defaults` writes them), overrides use
dotted keys for nested fields, and every value is checked against the field's type annotation. Unknown
keys, wrong types and a dataclass's own `__post_init__` checks all raise `ConfigError`, a one-line
message that names the full dotted key (and the closest known key when one was misspelt).

On the command line, `add_config_arguments` gives a parser `--config FILE`, one `--dotted.key VALUE`
option per leaf field (its help shows the field's help, type and default) and bare `key=value`
overrides; `config_from_args` resolves them in that order of precedence, later wins.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from openmae.errors import UsageError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "diff_from_defaults",
    "load_config",
    "merge_updates",
    "nest_dotted",
    "parse_config_cli",
    "parse_overrides",
    "save_config",
]


class ConfigError(UsageError):
    """An unknown config key, a value of the wrong type, or a value the config's own checks reject."""


# ---------------------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; YAML 1.2 and every person
# writing a learning rate read it as a float, so the loader resolves floats the 1.2 way.


class _Loader(yaml.SafeLoader):
    pass


_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class _CliText(str):
    """Override text not yet parsed: parsed as YAML against the field's type, kept verbatim for `str`
    fields (so `name=0.10` or `name=off` stay the strings that were typed)."""


# ---------------------------------------------------------------------------------------------------------
# Public API


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `yaml_path`, then `key=value` overrides.

    Overrides use dotted keys for nested dataclasses (`data.path=/images optim.lr=1e-3`); their values
    are YAML scalars or flow sequences (`1e-4`, `true`, `null`, `[0.2, 1.0]`). Later overrides win.
    Raises `ConfigError` on an unknown key, a wrong type or a value `__post_init__` rejects.
    """
    updates = _read_yaml(yaml_path) if yaml_path is not None else {}
    for key, value in parse_overrides(overrides):
        _set_dotted(updates, key, value)
    return config_from_dict(cls, updates)


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build `cls` from its defaults updated by the nested mapping `data` (e.g. a saved config)."""
    return _build(cls, data, prefix="")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """Split `key=value` strings at the first `=`; values stay text until checked against a field."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        pairs.append((key.strip(), _CliText(value.strip())))
    return pairs


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of `cfg` that YAML and JSON can store (tuples as lists, paths as strings)."""
    if not _is_dataclass_instance(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    """`cfg` as a YAML document, fields in declaration order (what `save_config` writes)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `cfg` as YAML to `path` (parent folders created); `load_config` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path


def nest_dotted(dotted: Mapping[str, Any]) -> dict:
    """`{"data.path": x, "epochs": 2}` -> `{"data": {"path": x}, "epochs": 2}` (for `config_from_dict`)."""
    updates: dict = {}
    for key, value in dotted.items():
        _set_dotted(updates, key, value)
    return updates


def merge_updates(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """Nested updates `extra` laid over `base`: sections merge key by key, other values replace."""
    return _deep_merge(dict(base), extra)


def diff_from_defaults(cfg: Any) -> dict:
    """The nested dict of only the leaves of `cfg` that differ from its class's defaults.

    Fields without a default are always included, so the result is a complete, minimal YAML config.
    """
    cls = type(cfg)
    required = _required_values(cfg)
    defaults = config_to_dict(_build(cls, required, prefix=""))
    diff = _dict_diff(config_to_dict(cfg), defaults)
    return _deep_merge(diff, required)


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add `--config FILE`, one `--dotted.key VALUE` per leaf field of `cls`, and `key=value` overrides.

    Options that are not given stay out of the namespace, so `config_from_args` can tell a value set
    on the command line from a default.
    """
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML file of changes to the defaults")
    group = parser.add_argument_group(f"{cls.__name__} options (also as key=value)")
    for key, field, tp, default in _leaf_fields(cls):
        help_text = field.metadata.get("help", "")
        details = f"{_type_name(tp)}, default: {_format_default(default)}"
        group.add_argument(
            f"--{key}",
            dest=key,
            metavar=_metavar(tp),
            default=argparse.SUPPRESS,
            # argparse %-formats help strings, so a literal % in a field's help must be doubled.
            help=(f"{help_text} ({details})" if help_text else details).replace("%", "%%"),
        )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys, e.g. data.path=/images",
    )
    return parser


def config_from_args(
    cls: type[T],
    namespace: argparse.Namespace,
    extra: Sequence[str] = (),
    find_config: Callable[[str], str | Path] | None = None,
) -> T:
    """Resolve `cls` from parsed arguments: defaults < `--config` YAML < `--key value` < `key=value`.

    `extra` are arguments argparse left over (`parse_known_args`): `key=value` overrides placed between
    options. `find_config` maps the `--config` argument to a file (e.g. a shipped config's name).
    """
    overrides = [
        f"{key}={getattr(namespace, key)}" for key, *_ in _leaf_fields(cls) if hasattr(namespace, key)
    ]
    for item in extra:
        if item.startswith("-"):
            options = [f"--{key}" for key, *_ in _leaf_fields(cls)]
            raise ConfigError(f"unknown option {item.split('=')[0]!r}{_suggest(item.split('=')[0], options)}")
    overrides += list(getattr(namespace, "overrides", None) or []) + list(extra)
    config_arg = getattr(namespace, "config", None)
    yaml_path = None if config_arg is None else find_config(config_arg) if find_config else config_arg
    return load_config(cls, yaml_path, overrides)


def parse_config_cli(
    cls: type[T],
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    find_config: Callable[[str], str | Path] | None = None,
) -> T:
    """Parse `argv` (default: `sys.argv[1:]`) into `cls` with a parser from `add_config_arguments`.

    `parser` may be a subcommand's parser; it gets the config options added. Raises `ConfigError`.
    """
    parser = parser or argparse.ArgumentParser(description=(cls.__doc__ or "").strip() or None)
    add_config_arguments(parser, cls)
    namespace, extra = parser.parse_known_args(argv)
    return config_from_args(cls, namespace, extra, find_config)


# ---------------------------------------------------------------------------------------------------------
# Building a dataclass from nested updates


def _build(cls: type[T], updates: Mapping[str, Any], prefix: str, base: Any = None) -> T:
    """`cls` from `base` (or the field defaults) with `updates` applied, every value type-checked."""
    if not isinstance(updates, Mapping):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or cls.__name__!r} expects a mapping, got {updates!r}"
        )
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in updates:
        if name not in fields:
            key = f"{prefix}{name}"
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, _dotted_keys(cls, prefix))}")
    kwargs = {}
    for name, field in fields.items():
        key, tp = f"{prefix}{name}", hints[name]
        current = getattr(base, name) if base is not None else _field_default(field)
        if name in updates:
            value = updates[name]
            if _is_dataclass_type(tp) and isinstance(value, _CliText) and value.lstrip().startswith("{"):
                value = _yaml_load(value)  # `data={path: x}`: a flow mapping of section updates
            if _is_dataclass_type(tp) and isinstance(value, Mapping):
                # A section updates the section's defaults rather than replacing them.
                sub_base = current if _is_dataclass_instance(current) else None
                kwargs[name] = _build(tp, value, f"{key}.", sub_base)
            else:
                kwargs[name] = _coerce(value, tp, key)
        elif current is not dataclasses.MISSING:
            kwargs[name] = current
        elif _is_dataclass_type(tp):
            kwargs[name] = _build(tp, {}, f"{key}.")
        else:
            raise ConfigError(f"config key {key!r} has no default and was not given")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        where = f"config section {prefix.rstrip('.')!r}" if prefix else cls.__name__
        message = " ".join(str(error).split())
        raise ConfigError(f"invalid {where}: {message}") from error


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to the annotation `tp`, or `ConfigError` naming `key`."""
    if isinstance(value, _CliText):
        if tp is str:
            return str(value)
        try:
            parsed = _yaml_load(value) if value else None
        except yaml.YAMLError:
            parsed = str(value)
        try:
            return _coerce(parsed, tp, key)
        except ConfigError:
            if _accepts_str(tp):  # e.g. `str | None` given `off`: the text, not YAML's bool
                return str(value)
            raise
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
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, f"{key}.")
        raise _type_error(key, tp, value)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, args: tuple, tp: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error (e.g. an unknown nested key) is the useful one
        if value is None:
            raise _type_error(key, tp, value)
        try:
            return _coerce(value, options[0], key)
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
            return _coerce(value, option, key)
        except ConfigError:
            continue
    raise _type_error(key, tp, value)


def _coerce_sequence(value: Any, container: type, args: tuple, tp: Any, key: str) -> Any:
    if (
        isinstance(value, str) and "," in value and not value.lstrip().startswith("[")
    ):  # `--data.scale 0.2,1.0` without shell quoting
        value = [_CliText(part.strip()) for part in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _type_error(key, tp, value)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item_tp = args[0] if args else Any
    return container(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))


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
    return _TypeMismatch(key, f"config key {key!r} expects {_type_name(tp)}, got {value!r}")


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return tp is str


# ---------------------------------------------------------------------------------------------------------
# Walking dataclasses


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as error:  # `from __future__ import annotations` + a class defined in a function
        raise TypeError(f"cannot resolve the field types of {cls.__name__}: {error}") from error


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _leaf_fields(
    cls: type, prefix: str = "", defaults: Any = None
) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """`(dotted key, field, type, default)` for every non-dataclass field, nested sections expanded."""
    hints = _type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp = f"{prefix}{field.name}", hints[field.name]
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        if _is_dataclass_type(tp):
            yield from _leaf_fields(tp, f"{key}.", default if _is_dataclass_instance(default) else None)
        else:
            yield key, field, tp, default


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key under `cls` (sections and leaves), for suggesting the one that was meant."""
    keys = []
    hints = _type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            keys.append(f"{prefix}{field.name}")
            if _is_dataclass_type(hints[field.name]):
                keys += _dotted_keys(hints[field.name], f"{prefix}{field.name}.")
    return keys


def _suggest(key: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not matches:  # `weight_decay` for `optim.weight_decay`: compare the last parts as well
        last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        matches = [
            last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.8)
        ]
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _required_values(cfg: Any) -> dict:
    """The plain values of the fields of `cfg` (nested too) that have no default."""
    required: dict = {}
    for field in dataclasses.fields(cfg):
        if not field.init:
            continue
        value = getattr(cfg, field.name)
        if _field_default(field) is not dataclasses.MISSING:
            continue
        if _is_dataclass_instance(value):
            nested = _required_values(value)
            if nested:
                required[field.name] = nested
        else:
            required[field.name] = _plain(value)
    return required


# ---------------------------------------------------------------------------------------------------------
# Plain values and nested dicts


def _plain(value: Any) -> Any:
    if _is_dataclass_instance(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read_yaml(path: str | Path) -> dict:
    try:
        data = _yaml_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}"
        ) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _set_dotted(updates: dict, key: str, value: Any) -> None:
    """`updates[a][b][c] = value` for `key = "a.b.c"`, creating (or replacing non-mapping) sections."""
    *sections, leaf = key.split(".")
    node = updates
    for section in sections:
        child = node.get(section)
        if isinstance(child, _CliText):  # `data={path: x}` given before `data.path=y`
            child = _yaml_load(child) if child else None
        node[section] = dict(child) if isinstance(child, Mapping) else {}
        node = node[section]
    node[leaf] = value


def _dict_diff(current: dict, defaults: dict) -> dict:
    diff = {}
    for name, value in current.items():
        default = defaults.get(name, dataclasses.MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _dict_diff(value, default)
            if nested:
                diff[name] = nested
        elif value != default or type(value) is not type(default):
            diff[name] = value
    return diff


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


# ---------------------------------------------------------------------------------------------------------
# Names shown in messages and --help


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _metavar(tp: Any) -> str:
    """A short placeholder for --help; no spaces or brackets, which break argparse's usage wrapping."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _metavar(options[0]) if len(options) == 1 else "VALUE"
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if tp in (int, float, bool, str):
        return tp.__name__.upper()
    if origin in (tuple, list) or tp in (tuple, list):
        return "LIST"
    return "VALUE"


def _format_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    value = _plain(value)
    if isinstance(value, str):
        return value if value else "''"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
