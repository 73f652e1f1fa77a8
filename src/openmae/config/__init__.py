"""Run configuration: dataclass defaults, then a YAML file, then the command line.

Every run is described by (nested) dataclasses whose fields carry `metadata={"help": ...}`. This package
works for any such dataclass:

    cfg = load_config(PretrainConfig, "configs/demo.yaml", ["epochs=2", "data.path=/images"])

YAML files hold only the differences from the defaults, overrides use dotted keys for nested fields,
and every value is checked against the field's type annotation. Unknown keys, wrong types and a
dataclass's own `__post_init__` checks all raise `ConfigError`, a one-line message that names the full
dotted key (and the closest known key when one was misspelt).

On the command line, `add_config_arguments` gives a parser `--config FILE`, one `--dotted.key VALUE`
option per leaf field (its help shows the field's help, type and default) and bare `key=value`
overrides. Precedence is defaults < `--config` YAML < command line, and the command line gives each key
once: `--epochs 3` and `epochs=3` are the same setting, so a key given twice (in either spelling) is a
`ConfigError` naming it and both values. Options match by their whole name only (`--epoch` is an error
that suggests `--epochs`). From Python, `load_config`'s overrides apply in order, later ones winning.

Modules: `yaml_io` (YAML 1.2 floats, read / save), `coerce` (a value against an annotation), `build`
(nested dataclasses from updates), `cli` (argparse), `fields` (what they share).
"""

from openmae.config.build import config_from_dict, load_config, merge_updates, nest_dotted, parse_overrides
from openmae.config.cli import add_config_arguments, config_from_args, parse_config_cli
from openmae.config.fields import ConfigError
from openmae.config.yaml_io import config_to_dict, config_to_yaml, save_config

__all__ = [
    "ConfigError",
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "merge_updates",
    "nest_dotted",
    "parse_config_cli",
    "parse_overrides",
    "save_config",
]
