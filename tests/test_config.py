"""The config system on small dataclasses: defaults -> YAML -> overrides, type checks, errors, CLI."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from openmae.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config_cli,
    save_config,
)
from openmae.errors import UsageError


@dataclass
class DataCfg:
    path: str = field(default="/data/train", metadata={"help": "image folder"})
    crop_scale: tuple[float, float] = field(default=(0.2, 1.0), metadata={"help": "crop area range"})
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    hflip: bool = True


@dataclass
class OptimCfg:
    name: str = "adamw"
    lr: float | None = field(default=None, metadata={"help": "absolute lr (100% of peak)"})
    weight_decay: float = field(default=0.05, metadata={"help": "decoupled weight decay"})
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None  # noqa: UP045 - the typing.Optional spelling must work too


@dataclass
class RunCfg:
    """A run: model name, schedule and two nested sections."""

    model: str = field(default="mae_vit_debug", metadata={"help": "named model size"})
    epochs: int = field(default=800, metadata={"help": "training epochs"})
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    img_size: int | tuple[int, int] = 224
    resume: str | None = field(default=None, metadata={"help": "checkpoint path or 'auto'"})
    compile: bool = False
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=lambda: OptimCfg(weight_decay=0.1))

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")


@dataclass
class NeedsName:
    name: str
    size: int = 1


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_including_a_section_default_factory():
    cfg = load_config(RunCfg)
    assert cfg == RunCfg()
    assert cfg.optim.weight_decay == 0.1  # the section's factory, not OptimCfg's own default
    assert cfg.data.crop_scale == (0.2, 1.0)


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write_yaml(tmp_path, "epochs: 50\nmodel: big\noptim:\n  lr: 1e-4\n  name: lars\n")
    cfg = load_config(RunCfg, path, ["epochs=10", "optim.lr=2e-3", "epochs=12"])
    assert cfg.epochs == 12  # the last override beats the earlier one and the YAML
    assert cfg.model == "big"  # YAML beats the default
    assert cfg.optim.lr == 2e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "lars"
    assert cfg.optim.weight_decay == 0.1  # a YAML section changes only the keys it names


def test_dotted_keys_reach_nested_fields_and_keep_the_rest():
    cfg = load_config(RunCfg, None, ["data.path=/images", "optim.clip_grad=1", "data.hflip=false"])
    assert cfg.data == DataCfg(path="/images", hflip=False)
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.optim.weight_decay == 0.1


def test_a_section_given_as_a_flow_mapping_updates_that_section():
    cfg = load_config(RunCfg, None, ["optim={lr: 1e-3, name: lars}", "optim.name=sgd"])
    assert cfg.optim == OptimCfg(name="sgd", lr=1e-3, weight_decay=0.1)


@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("optim.lr=1e-4", ("optim", "lr"), 1e-4),  # YAML 1.1 would leave `1e-4` a string
        ("optim.lr=null", ("optim", "lr"), None),
        ("optim.warmup_epochs=5", ("optim", "warmup_epochs"), 5.0),  # float fields accept ints
        ("compile=true", ("compile",), True),
        ("compile=False", ("compile",), False),
        ("compile=no", ("compile",), False),
        ("compile=1", ("compile",), True),
        ("precision=bf16", ("precision",), "bf16"),
        ("img_size=32", ("img_size",), 32),
        ("img_size=[32, 48]", ("img_size",), (32, 48)),
        ("data.crop_scale=[0.08, 1]", ("data", "crop_scale"), (0.08, 1.0)),
        ("data.crop_scale=0.5,1.0", ("data", "crop_scale"), (0.5, 1.0)),
        ("data.mean=[0.1, 0.2]", ("data", "mean"), [0.1, 0.2]),
        ("resume=auto", ("resume",), "auto"),
        ("resume=null", ("resume",), None),
        ("resume=off", ("resume",), "off"),  # a str field keeps the text YAML would read as a bool
        ("model=0.10", ("model",), "0.10"),  # ... or as a number
        ("data.path=/a=b", ("data", "path"), "/a=b"),  # only the first `=` splits
    ],
)
def test_values_are_coerced_to_the_field_type(override, attr, expected):
    value = load_config(RunCfg, None, [override])
    for name in attr:
        value = getattr(value, name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=ten", "config key 'epochs' expects int, got 'ten'"),
        ("epochs=2.5", "config key 'epochs' expects int, got 2.5"),
        ("compile=maybe", "config key 'compile' expects bool, got 'maybe'"),
        ("precision=fp64", "config key 'precision' expects one of 'fp32', 'bf16', 'fp16', got 'fp64'"),
        ("optim.lr=fast", "config key 'optim.lr' expects float | None, got 'fast'"),
        (
            "data.crop_scale=[1, 2, 3]",
            "config key 'data.crop_scale' expects tuple[float, float], got [1, 2, 3]",
        ),
        ("data.mean=[0.1, x]", "config key 'data.mean[1]' expects float, got 'x'"),
        ("img_size=big", "config key 'img_size' expects int | tuple[int, int], got 'big'"),
        ("data=3", "config key 'data' expects DataCfg, got 3"),
        (
            "data.crop_scale=[0.2, 1",
            "config key 'data.crop_scale' expects tuple[float, float], got '[0.2, 1'",
        ),
        ("compile=2", "config key 'compile' expects bool, got 2"),
    ],
)
def test_wrong_types_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RunCfg, None, [override])
    assert str(info.value) == message


def test_wrong_type_in_yaml_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  weight_decay: heavy\n")
    with pytest.raises(ConfigError, match=r"^config key 'optim.weight_decay' expects float, got 'heavy'$"):
        load_config(RunCfg, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "optim.weight_decy=0.1",
            "unknown config key 'optim.weight_decy' (did you mean 'optim.weight_decay'?)",
        ),
        ("epoch=3", "unknown config key 'epoch' (did you mean 'epochs'?)"),
        ("weight_decay=0.1", "unknown config key 'weight_decay' (did you mean 'optim.weight_decay'?)"),
        ("dta.path=/x", "unknown config key 'dta' (did you mean 'data'?)"),
        ("zzz=1", "unknown config key 'zzz'"),
    ],
)
def test_unknown_keys_suggest_the_closest_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RunCfg, None, [override])
    assert str(info.value) == message


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "data:\n  pth: /x\n")
    with pytest.raises(
        ConfigError, match=re.escape("unknown config key 'data.pth' (did you mean 'data.path'?)")
    ):
        load_config(RunCfg, path)


def test_malformed_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(RunCfg, None, ["epochs"])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(RunCfg, write_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(RunCfg, tmp_path / "missing.yaml")
    assert load_config(RunCfg, write_yaml(tmp_path, "# only a comment\n")) == RunCfg()


def test_post_init_error_becomes_config_error():
    with pytest.raises(ConfigError, match=r"^invalid RunCfg: epochs must be at least 1, got 0$") as info:
        load_config(RunCfg, None, ["epochs=0"])
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)
    assert isinstance(info.value.__cause__, ValueError)


def test_required_fields_must_be_given():
    with pytest.raises(ConfigError, match="'name' has no default"):
        load_config(NeedsName)
    assert load_config(NeedsName, None, ["name=x"]) == NeedsName(name="x")


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        RunCfg,
        None,
        ["epochs=3", "img_size=[32, 48]", "optim.lr=1e-4", "data.crop_scale=[0.5, 1]", "resume=auto"],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    plain = yaml.safe_load(path.read_text())  # plain YAML: no python tags, tuples stored as lists
    assert plain["data"]["crop_scale"] == [0.5, 1.0] and plain["img_size"] == [32, 48]
    assert load_config(RunCfg, path) == cfg
    assert config_from_dict(RunCfg, config_to_dict(cfg)) == cfg


def help_text(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_help().split())  # undo argparse's line wrapping


def test_help_lists_every_leaf_option_with_its_default():
    parser = add_config_arguments(argparse.ArgumentParser(prog="mae pretrain"), RunCfg)
    text = help_text(parser)
    leaves = {
        "model": "mae_vit_debug",
        "epochs": "800",
        "precision": "fp32",
        "img_size": "224",
        "resume": "null",
        "compile": "false",
        "data.path": "/data/train",
        "data.crop_scale": "[0.2, 1.0]",
        "data.mean": "[0.5, 0.5, 0.5]",
        "data.hflip": "true",
        "optim.name": "adamw",
        "optim.lr": "null",
        "optim.weight_decay": "0.1",  # the section factory's value
        "optim.warmup_epochs": "40.0",
        "optim.clip_grad": "null",
    }
    section = text.split("RunCfg options (also as key=value):", 1)[1]  # after the usage line ...
    section = section.split("Precedence:", 1)[0]  # ... and before the epilog
    assert set(re.findall(r"--([\w.]+)", section)) == set(leaves)
    for key, default in leaves.items():
        entry = section.split(f"--{key} ", 1)[1].split(" --", 1)[0]
        assert f"default: {default}" in entry, key
    assert "training epochs (int, default: 800)" in text
    assert "absolute lr (100% of peak) (float | None, default: null)" in text  # a % in help is kept
    assert "--precision {fp32,bf16,fp16} one of 'fp32', 'bf16', 'fp16', default: fp32" in text
    assert "--config FILE" in text and "KEY=VALUE" in text


def test_cli_precedence_defaults_then_yaml_then_command_line(tmp_path):
    path = write_yaml(tmp_path, "epochs: 50\nmodel: from_yaml\noptim:\n  lr: 1e-4\n")
    argv = ["--config", str(path), "--epochs", "7", "optim.lr=3e-3", "data.hflip=no", "seed_free=no"]
    with pytest.raises(ConfigError, match="unknown config key 'seed_free'"):
        parse_config_cli(RunCfg, argv)
    cfg = parse_config_cli(RunCfg, argv[:-1])
    assert cfg.model == "from_yaml"  # YAML over default
    assert cfg.epochs == 7  # --epochs over YAML
    assert cfg.optim.lr == 3e-3  # key=value over YAML
    assert cfg.data.hflip is False and cfg.optim.weight_decay == 0.1  # the rest: defaults
    cfg = parse_config_cli(RunCfg, ["--config", str(path), "--data.crop_scale", "0.3,1", "--compile", "true"])
    assert cfg.epochs == 50 and cfg.data.crop_scale == (0.3, 1.0) and cfg.compile is True


def test_cli_on_a_subparser_with_config_finder(tmp_path):
    write_yaml(tmp_path, "epochs: 5\n")
    parser = argparse.ArgumentParser(prog="mae")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_arguments(sub.add_parser("pretrain"), RunCfg)
    namespace, extra = parser.parse_known_args(
        ["pretrain", "--config", "run", "--data.path", "/x", "model=m"]
    )
    cfg = config_from_args(RunCfg, namespace, extra, find_config=lambda name: tmp_path / f"{name}.yaml")
    assert (cfg.epochs, cfg.data.path, cfg.model) == (5, "/x", "m")


def test_cli_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigError, match=re.escape("unknown option '--optim.weight_decy' (did you mean")):
        parse_config_cli(RunCfg, ["--optim.weight_decy", "0.1"])
    with pytest.raises(ConfigError, match="config key 'epochs' expects int, got 'ten'"):
        parse_config_cli(RunCfg, ["--epochs", "ten"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "7", "epochs=9"],
        ["epochs=9", "--optim.lr", "1e-3", "--epochs", "7"],  # whatever the order on the line
        ["epochs=7", "epochs=9"],
        ["--epochs", "7", "--epochs=9"],
    ],
)
def test_cli_a_key_given_twice_is_an_error_naming_it_and_both_values(argv):
    with pytest.raises(ConfigError) as info:
        parse_config_cli(RunCfg, argv)
    message = str(info.value)
    assert message.startswith("config key 'epochs' is given twice on the command line: ")
    assert "'7'" in message and "'9'" in message and len(message.splitlines()) == 1
    with pytest.raises(ConfigError, match="'data.path' is given twice"):  # even with the same value
        parse_config_cli(RunCfg, ["--data.path", "/x", "data.path=/x"])


def test_cli_options_match_whole_names_only():
    with pytest.raises(ConfigError, match=re.escape("unknown option '--epoch' (did you mean '--epochs'?)")):
        parse_config_cli(RunCfg, ["--epoch", "3"])
    abbreviated = "unknown option '--optim.war' (did you mean '--optim.warmup_epochs'?)"
    with pytest.raises(ConfigError, match=re.escape(abbreviated)):
        parse_config_cli(RunCfg, ["--optim.war=3"])
    # Also on a parser the caller made with argparse's default (prefix matching on).
    parser = add_config_arguments(argparse.ArgumentParser(), RunCfg)
    namespace, extra = parser.parse_known_args(["--epoch", "3"])
    assert not hasattr(namespace, "epochs")
    with pytest.raises(ConfigError, match="did you mean '--epochs'"):
        config_from_args(RunCfg, namespace, extra)


def test_help_states_the_precedence_and_an_example_key_of_the_class():
    text = help_text(add_config_arguments(argparse.ArgumentParser(), RunCfg))
    assert "Precedence: the defaults, then the YAML file of --config, then the command line." in text
    assert "giving a key twice is an error" in text
    assert "e.g. model=mae_vit_debug" in text  # RunCfg's first str field, with its default
    # A section's class alone has no `data.` prefix: the example is its own key.
    assert "e.g. path=/data/train" in help_text(add_config_arguments(argparse.ArgumentParser(), DataCfg))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["img_size=[32,48]"], (32, 48)),
        (["img_size=32,48"], (32, 48)),
        (["--img_size", "32,48"], (32, 48)),
        (["img_size=32"], 32),
        (["img_size=null"], None),
    ],
)
def test_recipe_configs_take_rectangular_image_sizes(argv, expected):
    from openmae.recipes.evaluate import EvalConfig
    from openmae.recipes.linprobe import LinprobeConfig
    from openmae.recipes.pretrain import PretrainConfig

    for cls, required in [(PretrainConfig, []), (LinprobeConfig, []), (EvalConfig, ["checkpoint=c"])]:
        assert parse_config_cli(cls, [*argv, *required]).img_size == expected, cls.__name__
    with pytest.raises(ConfigError, match=re.escape("'img_size' expects int | tuple[int, int] | None")):
        parse_config_cli(PretrainConfig, ["img_size=32,48,64"])
