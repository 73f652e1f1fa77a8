"""A config dataclass on the command line: `--config FILE`, `--dotted.key VALUE` and `key=value`.

Precedence is defaults < `--config` YAML < command line, and the command line names each key once:
`--epochs 3` and `epochs=3` are two spellings of one setting, so giving a key twice (in either
spelling) is an error rather than a silent choice. Options are matched by their whole name only
(`--epoch` is not taken for `--epochs`), since a prefix that works today may name another key tomorrow.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from openmae.config.build import load_config, parse_overrides
from openmae.config.fields import ConfigError, leaf_fields, plain, suggest, type_name
from openmae.errors import UsageError

T = TypeVar("T")

PRECEDENCE = (
    "Precedence: the defaults, then the YAML file of --config, then the command line. On the command "
    "line each key is given once, as --key VALUE or as key=VALUE (dotted keys for nested sections); "
    "giving a key twice is an error. Values are read as YAML: 1e-4, true, null, [0.2,1.0] (or 0.2,1.0)."
)


class CommandParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` for openmae's commands: options match by their whole name only, and
    bad arguments raise `UsageError` (one line, exit code 2 from `mae`) naming the closest option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        namespace, extra = self.parse_known_args(args, namespace)
        reject_unknown_options(extra, option_strings(self))
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option `parser` knows (`--epochs`, `-h`, ...); argparse keeps no public list of them."""
    return list(parser._option_string_actions)


def reject_unknown_options(extra: Sequence[str], options: list[str]) -> None:
    """`ConfigError` for the first argument in `extra` that looks like an option, with the option meant:
    the one it abbreviates when there is one, else the closest."""
    for item in extra:
        if item.startswith("-"):
            name = item.split("=", 1)[0]
            longer = [option for option in options if option.startswith(name)]
            hint = f" (did you mean {longer[0]!r}?)" if len(longer) == 1 else suggest(name, options)
            raise ConfigError(f"unknown option {name!r}{hint}")


def reject_repeated_keys(overrides: Sequence[str]) -> None:
    """`ConfigError` naming a key that the `key=value` strings of one command line give twice."""
    seen: dict[str, str] = {}
    for key, value in parse_overrides(overrides):
        if key in seen:
            raise ConfigError(
                f"config key {key!r} is given twice on the command line: {seen[key]!r} and {value!r}"
                " (give each key once)"
            )
        seen[key] = value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add `--config FILE`, one `--dotted.key VALUE` per leaf field of `cls`, and `key=value` overrides.

    Options that are not given stay out of the namespace, so `config_from_args` can tell a value set
    on the command line from a default. The parser stops matching option prefixes, and its epilog
    states the precedence.
    """
    parser.allow_abbrev = False
    parser.epilog = f"{parser.epilog} {PRECEDENCE}" if parser.epilog else PRECEDENCE
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML file of changes to the defaults")
    group = parser.add_argument_group(f"{cls.__name__} options (also as key=value)")
    for key, field, tp, default in leaf_fields(cls):
        help_text = field.metadata.get("help", "")
        details = f"{type_name(tp)}, default: {_format_default(default)}"
        group.add_argument(
            f"--{key}",
            dest=key,
            metavar=_metavar(tp),
            action="append",  # every value given, so a repeated option is an error, not the last one
            default=argparse.SUPPRESS,
            # argparse %-formats help strings, so a literal % in a field's help must be doubled.
            help=(f"{help_text} ({details})" if help_text else details).replace("%", "%%"),
        )
    example = _override_example(cls)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys" + (f", e.g. {example}" if example else ""),
    )
    return parser


def config_from_args(
    cls: type[T],
    namespace: argparse.Namespace,
    extra: Sequence[str] = (),
    find_config: Callable[[str], str | Path] | None = None,
) -> T:
    """Resolve `cls` from parsed arguments: defaults < `--config` YAML < `--key value` and `key=value`.

    `extra` are arguments argparse left over (`parse_known_args`): `key=value` overrides placed between
    options. `find_config` maps the `--config` argument to a file (e.g. a shipped config's name).
    Raises `ConfigError` on an unknown option or a key given twice.
    """
    keys = [key for key, *_ in leaf_fields(cls)]
    reject_unknown_options(extra, ["--config", *(f"--{key}" for key in keys)])
    overrides = [f"{key}={value}" for key in keys for value in getattr(namespace, key, [])]
    overrides += list(getattr(namespace, "overrides", None) or []) + list(extra)
    reject_repeated_keys(overrides)
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
    parser = parser or CommandParser(description=(cls.__doc__ or "").strip() or None)
    add_config_arguments(parser, cls)
    namespace, extra = parser.parse_known_args(argv)
    reject_unknown_options(extra, option_strings(parser))  # the parser's own options too (`--max-images`)
    return config_from_args(cls, namespace, extra, find_config)


# ---------------------------------------------------------------------------------------------------------
# What --help shows


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
    value = plain(value)
    if isinstance(value, str):
        return value if value else "''"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _override_example(cls: type) -> str:
    """`key=value` for the first string field of `cls` (its real dotted key), or "" without fields."""
    leaves = list(leaf_fields(cls))
    if not leaves:
        return ""
    strings = [leaf for leaf in leaves if str in (leaf[2], *typing.get_args(leaf[2]))]
    key, _, tp, default = (strings or leaves)[0]
    return f"{key}={default if isinstance(default, str) and default else _metavar(tp)}"
