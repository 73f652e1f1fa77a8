"""The `mae` command end to end on the debug model."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from openmae.cli import main

TINY = ["model=mae_vit_debug", "data.num_workers=0", "batch_size=4", "epochs=1", "vis_every=0"]


def write_images(folder, count, size=40, corrupt=True):
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    if corrupt:
        (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        (folder / "b" / "empty.jpg").write_bytes(b"")


def test_pretrain_on_an_image_folder_writes_checkpoint_config_metrics_and_counts_unreadable_files(tmp_path):
    write_images(tmp_path / "images", 10)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken.png|empty.jpg"):
        tiny = [arg for arg in TINY if not arg.startswith("batch_size=")]  # a key is given once
        code = main(
            ["pretrain", *tiny, f"data.path={tmp_path / 'images'}", f"output_dir={out}", "batch_size=6"]
        )
    assert code == 0
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "skipped_images" in r]
    assert epoch and epoch[-1]["skipped_images"] == 2  # 12 files, 2 unreadable, one epoch of 12


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mask_ratio=1.0", "mask_ratio"),
        ("img_size=30", "divisible"),
        ("data.path=/no/such/folder", "/no/such/folder"),
        ("optim.weight_decy=0.1", "did you mean 'optim.weight_decay'"),
        ("epochs=ten", "epochs"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2_and_nothing_written(
    tmp_path, capsys, override, message
):
    write_images(tmp_path / "images", 4, corrupt=False)
    out = tmp_path / "run"
    code = main(["pretrain", *TINY, f"data.path={tmp_path / 'images'}", f"output_dir={out}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for option in ["--epochs", "--mask_ratio", "--optim.base_lr", "--data.path", "--resume", "--precision"]:
        assert option in text
    assert "the model's, 0.75" in " ".join(text.split()) and "default: 0.00015" in text


def test_models_lists_the_named_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mae_vit_base_patch16" in out and "mae_vit_huge_patch14" in out


def test_console_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "openmae", "models"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "mae_vit_debug" in done.stdout


def test_visualize_writes_a_grid_for_given_images_and_for_the_dataset(tmp_path):
    from PIL import Image as PILImage

    from openmae import viz

    write_images(tmp_path / "images", 3, corrupt=False)
    run = tmp_path / "run"
    args = ["model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=8", "data.num_workers=0"]
    assert main(["pretrain", *args, "batch_size=4", "epochs=1", "vis_every=0", f"output_dir={run}"]) == 0
    out = tmp_path / "grid.png"
    code = main(["visualize", "--checkpoint", str(run / "model.safetensors"), str(tmp_path / "images"),
                 "--out", str(out), "--mask-ratio", "0.5"])  # fmt: skip
    assert code == 0
    assert PILImage.open(out).size == viz.grid_size_px(3, 32, 32, viz.auto_scale(32, 32))
    out2 = tmp_path / "dataset.png"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(run / "model.safetensors"),
                "--out",
                str(out2),
                "--num-images",
                "2",
            ]
        )
        == 0
    )
    assert PILImage.open(out2).size == viz.grid_size_px(2, 32, 32, viz.auto_scale(32, 32))
    assert main(["visualize", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2


def test_demo_runs_end_to_end_on_small_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        *["model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=16", "data.num_workers=0"],
        *["batch_size=8", "epochs=1", f"output_dir={out}", "time_budget_min=null", "--test-images", "8"],
    ]
    assert main(["demo", *args]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["test_images"] == 8 and results["masked_mse"] > 0 and results["baseline_mse"] > 0
    assert (out / "reconstructions.png").exists()
    assert "baseline" in capsys.readouterr().out


def test_stats_prints_mean_and_std_of_a_folder(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i, value in enumerate([0, 255]):
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["stats", f"path={folder}", "num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "data.mean=[0.5000, 0.5000, 0.5000]" in out and "data.std=[0.5000, 0.5000, 0.5000]" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["pretrain", "--epoch", "3"],
            "mae pretrain: error: unknown option '--epoch' (did you mean '--epochs'?)",
        ),
        (["stats", "--max", "3"], "mae stats: error: unknown option '--max' (did you mean '--max-images'?)"),
        (
            ["visualize", "--checkpoint", "c", "--mask", "0.5"],
            "mae visualize: error: unknown option '--mask' (did you mean '--mask-ratio'?)",
        ),
        (["bench", "--step", "1"], "mae bench: error: unknown option '--step' (did you mean '--steps'?)"),
        (["demo", "--test-image", "8"], "did you mean '--test-images'?"),
        (["models", "--al"], "mae models: error: unknown option '--al'"),
        (["--hepl"], "mae: error: unknown option '--hepl' (did you mean '--help'?)"),
        (["pretrian"], "mae: error: argument COMMAND: invalid choice: 'pretrian'"),
    ],
)
def test_abbreviated_or_unknown_options_are_one_line_errors_with_the_option_meant(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--epochs", "2", "epochs=1"],
        ["pretrain", "epochs=1", "--batch_size", "4", "epochs=2"],
        ["demo", "epochs=1", "epochs=2"],
    ],
)
def test_a_key_given_twice_on_the_command_line_is_an_error(tmp_path, capsys, argv):
    out = tmp_path / "run"
    assert main([*argv, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config key 'epochs' is given twice on the command line" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_pretrain_on_rectangular_images_from_the_command_line(tmp_path):
    from openmae import load_checkpoint

    out = tmp_path / "run"
    data = ["data.dataset=synthetic", "data.synthetic_size=8"]
    assert main(["pretrain", *TINY, "img_size=[32,48]", *data, f"output_dir={out}"]) == 0
    model = load_checkpoint(out / "model.safetensors")
    assert model.config.img_size == (32, 48) and model.grid_size == (4, 6)  # patch 8: a 4x6 grid


@pytest.mark.parametrize(
    ("command", "cls_path"),
    [("stats", "openmae.data:DataConfig"), ("pretrain", "openmae.recipes.pretrain:PretrainConfig")],
)
def test_help_example_override_is_a_key_the_command_accepts(capsys, command, cls_path):
    import importlib

    from openmae.config import load_config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    example = text.split("config overrides with dotted keys, e.g. ", 1)[1].split()[0]
    module, name = cls_path.split(":")
    load_config(getattr(importlib.import_module(module), name), None, [example])  # no ConfigError
    if command == "stats":
        assert example == "dataset=folder" and "data.path" not in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], ["plot      draw the loss, lr and monitor curves"]),
        (["plot", "--help"], ["RUN_DIR [RUN_DIR ...]", "--out OUT", "default: curves.png"]),
        (["pretrain", "--help"], ["--optim.lr_scaling STR", "default: sqrt", "default: 4096", "is held out"]),
        (["finetune", "--help"], ["--ema_decay FLOAT", "ema.safetensors", "default: 1024"]),
        (["linprobe", "--help"], ["--lars_reference_images INT", "default: 1281167", "default: linear"]),
        (["knn", "--help"], ["--num_classes INT"]),
    ],
)
def test_help_lists_the_commands_and_their_options(capsys, argv, expected):
    with pytest.raises(SystemExit):
        main(argv)
    text = " ".join(capsys.readouterr().out.split())
    for part in expected:
        assert " ".join(part.split()) in text, part
