"""Reading and writing config YAML.

PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; YAML 1.2 and every person writing a
learning rate read it as a float, so the loader here resolves floats the 1.2 way. Files are written as
plain YAML (no Python tags: tuples as lists, paths as strings), fields in declaration order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from openmae.config.fields import ConfigError, is_dataclass_instance, plain


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


def yaml_load(text: str) -> Any:
    """`text` parsed as YAML (safe, floats as in YAML 1.2)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    """The mapping in the YAML file at `path` (empty for an empty file), or `ConfigError`."""
    try:
        data = yaml_load(Path(path).read_text())
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


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of `cfg` that YAML and JSON can store (tuples as lists, paths as strings)."""
    if not is_dataclass_instance(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    """`cfg` as a YAML document, fields in declaration order (what `save_config` writes)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `cfg` as YAML to `path` (parent folders created); `load_config` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path
