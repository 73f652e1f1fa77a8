"""What every recipe does around the loop (`recipes.runs`), tried as a new user would on the CLI: each
bad input is one line on stderr and exit code 2 before anything is written; a dataset smaller than a
batch trains on a smaller one; reruns never mix with an old run; Ctrl-C exits 130; the defaults learn.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset

from openmae import create_model
from openmae.checkpoint import save_checkpoint
from openmae.cli import main
from openmae.config import load_config
from openmae.distributed import DistInfo
from openmae.errors import UsageError
from openmae.recipes import runs
from openmae.recipes.finetune import FinetuneConfig, finetune
from openmae.recipes.knn import KnnConfig, knn
from openmae.recipes.linprobe import LinprobeConfig, linprobe
from openmae.recipes.pretrain import PretrainConfig, pretrain

BASE = ["model=mae_vit_debug", "data.num_workers=0", "vis_every=0"]
TINY = [*BASE, "epochs=1"]


def photos(folder, count, size=40, classes=("a", "b"), suffix=".jpg"):
    """`count` random RGB images in class sub-folders (flat when `classes` is empty)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}{suffix}")
    return folder


def broken(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"broken{i}.jpg").write_bytes(b"not an image")
    return folder


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_checkpoint(create_model("mae_vit_debug"), root / "mae.safetensors")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "empty.pth").write_bytes(b"")
    photos(root / "train", 12)
    photos(root / "val", 6)
    photos(root / "flat", 6, classes=())
    broken(root / "allbad", 40)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no output folder


def bad_inputs():
    """(command, arguments, part of the message); `{root}` is the fixture folder, `{out}` the run's."""
    data = ["data.path={root}/train", "data.val_path={root}/val"]
    pre = ["pretrain", *TINY, "data.path={root}/flat", "output_dir={out}"]
    unreadable = "empty.pth is not a readable PyTorch checkpoint"
    return [
        (["pretrain", "--config", "nonexist.yaml", "output_dir={out}"], "nonexist.yaml' not found"),
        ([*pre, "resume={root}/empty.safetensors"], "empty.safetensors is not a safetensors file"),
        ([*pre, "accum_iter=64"], "fewer than one global batch even at batch_size 1"),
        ([*pre, "device=cuda"], "no CUDA GPU"),
        ([*pre, "precision=fp16"], "fp16 needs a CUDA GPU"),
        ([*pre, "optim.name=adamx"], "did you mean 'adamax'?"),
        ([*pre, "mask_ratio=0.99"], "hides all 16 patches"),  # 32 px, patch 8: 16 patches, int(0.16) = 0 kept
        ([*pre, "in_chans=4", "data.channels=4"], "image has 3 channels, 4 were asked for"),
        (["pretrain", *TINY, "data.path={root}/allbad", "output_dir={out}"], "none of the 32 training"),
        (["linprobe", *data, "checkpoint={root}/empty.pth", "output_dir={out}"], unreadable),
        (["finetune", *data, "checkpoint={root}/empty.pth", "output_dir={out}"], unreadable),
        (["linprobe", *data, "checkpoint={root}/empty.safetensors", "output_dir={out}"], "not a safetensors"),
        (["knn", *data, "checkpoint={root}/empty.pth", "output={out}"], unreadable),
        (["eval", "data.val_path={root}/val", "checkpoint={root}/empty.pth", "output={out}"], unreadable),
        (["eval", "data.val_path={root}/val", "checkpoint={root}/mae.safetensors", "output={out}"],
         "no classifier head (a pretraining or encoder checkpoint): train one with mae linprobe or mae"),
        (["visualize", "--checkpoint", "{root}/empty.pth", "{root}/flat", "--out", "{out}"], "empty.pth"),
        (["visualize", "--checkpoint", "{root}/mae.safetensors", "{root}/corrupt.jpg", "--out", "{out}"],
         "cannot read image"),
        (["stats", "path={root}/nothere"], "image folder not found"),
        (["plot", "{root}/nothere", "--out", "{out}"], "holds no metrics.jsonl"),
    ]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), bad_inputs(), ids=lambda v: v[0] if isinstance(v, list) else "")
def test_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(tmp_path, capsys, files, argv, message):
    if "device=cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    argv = [a.format(root=files, out=out) for a in argv]
    err = one_line_error(capsys, main(argv))
    assert message in err, err
    assert not out.exists()


def test_all_unreadable_and_mostly_unreadable_folders_fail(tmp_path, capsys, files):
    # Mostly unreadable: the probe finds images, the epoch then skips 30 of 40 (75%): exit 2, one line.
    folder = broken(photos(tmp_path / "mostly", 10, classes=()), 30)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken"):
        code = main(["pretrain", *TINY, f"data.path={folder}", "batch_size=4", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bars of the run
    assert last.startswith(
        "mae pretrain: error: 75% of the images of epoch 1 could not be read (30 of 40)"
    ), err
    assert not (out / "model.safetensors").exists()


def test_a_zero_byte_run_checkpoint_is_refused_before_the_run_starts(tmp_path, capsys, files):
    out = tmp_path / "run"
    args = ["pretrain", *BASE, f"data.path={files / 'flat'}", "batch_size=2", f"output_dir={out}"]
    assert main([*args, "epochs=1"]) == 0
    capsys.readouterr()
    state = sorted(out.glob("*.state.pt"))[-1]
    state.write_bytes(b"")
    err = one_line_error(capsys, main([*args, "epochs=2", "resume=auto"]))
    assert "training state" in err and "empty or truncated" in err, err


# ------------------------------------------------------------------------------------------------
# A dataset smaller than one global batch


@pytest.mark.parametrize(
    ("images", "batch", "accum", "minimum", "multiple", "expected"),
    [
        (48, 100, 1, 1, 1, 6),  # 8 steps an epoch
        (10, 64, 1, 2, 1, 2),  # a BatchNorm head needs 2
        (20, 64, 1, 1, 2, 2),  # mixup: even
        (40, 16, 1, 1, 1, 16),  # fits: unchanged
        (48, 100, 3, 1, 1, 2),  # 2 x 3 accumulated = 6 images a step
    ],
)
def test_fitted_batch(images, batch, accum, minimum, multiple, expected):
    cfg = load_config(PretrainConfig, overrides=[f"batch_size={batch}", f"accum_iter={accum}"])
    fitted = runs.fitted_batch(cfg, images, DistInfo(), "pretrain", minimum, multiple)
    assert fitted.batch_size == expected and fitted.batch_size * accum <= images


def test_a_dataset_smaller_than_one_batch_trains_on_a_smaller_one_and_the_lr_follows(tmp_path, capsys, files):
    out = tmp_path / "run"
    args = [*TINY, f"data.path={files / 'flat'}", "batch_size=100", f"output_dir={out}"]
    assert main(["pretrain", *args]) == 0
    stdout = capsys.readouterr().out
    assert (
        "batch_size 100 x accum_iter 1 x 1 processes is more than the 6 training images: using batch_size 1"
        in (stdout)
    )
    assert "sqrt(effective batch 1 / 4096)" in stdout  # the lr rule saw the batch used
    assert "batch_size: 1" in (out / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------------
# Channels


def test_keep_channels_on_a_folder_of_gray_rgb_and_multiband_images_converts_or_skips_them(tmp_path, capsys):
    folder = photos(tmp_path / "mixed", 6, classes=())
    for i in range(3):
        Image.open(folder / f"{i}.jpg").convert("L").save(folder / f"gray{i}.png")
    tifffile.imwrite(folder / "bands.tif", np.zeros((5, 40, 40), np.uint8), photometric="minisblack")
    out = tmp_path / "run"
    with pytest.warns(
        UserWarning, match=r"bands.tif: cannot convert a 5-channel image to RGB"
    ):  # named, as unreadable files are
        code = main(["pretrain", *TINY, f"data.path={folder}", "data.channels=keep", "batch_size=2",
                     f"output_dir={out}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["skipped_images"] == 1  # gray converted to RGB; the 5-band TIFF skipped


# ------------------------------------------------------------------------------------------------
# Reruns, lr lines, warm-up, Ctrl-C


def test_a_rerun_into_a_used_folder_is_refused_and_overwrite_starts_afresh(tmp_path, capsys, files):
    out = tmp_path / "run"
    args = ["pretrain", *BASE, f"data.path={files / 'flat'}", "batch_size=2", f"output_dir={out}"]
    assert main([*args, "epochs=2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    err = one_line_error(capsys, main([*args, "epochs=1"]))
    assert "holds a run already: continue it with resume=auto, replace it with overwrite=true" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    assert main([*args, "epochs=1", "overwrite=true"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*.safetensors")) == ["checkpoint-00000003.safetensors"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_loss" in r] == [1]  # the old run's epochs are gone


def test_the_lr_line_says_where_the_lr_came_from_and_a_long_warmup_is_cut(tmp_path, capsys, files):
    out = tmp_path / "run"
    args = [
        *BASE,
        f"data.path={files / 'flat'}",
        "batch_size=2",
        "epochs=2",
        "log_every=1",
        f"output_dir={out}",
    ]
    assert main(["pretrain", *args, "optim.lr=0.001"]) == 0
    stdout = capsys.readouterr().out
    assert "pretrain: lr 0.001 (optim.lr; effective batch 2)" in stdout
    # The paper's 40 warm-up epochs in a 2-epoch run: cut to 5% of it, and said.
    assert "warmup_epochs 40 is 2000% of this 2-epoch run: warming up for 0.1 epochs" in stdout
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert max(lrs) == pytest.approx(0.001, rel=0.05)  # the peak is reached


def test_keyboard_interrupt_outside_the_graceful_stop_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt  # a second Ctrl-C, or one before training started

    monkeypatch.setattr("openmae.recipes.pretrain.pretrain", interrupted)
    assert main(["pretrain", *TINY, "data.dataset=synthetic"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "resume=auto" in err, err


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_ctrl_c_exits_130_and_sigterm_0_each_with_a_checkpoint_and_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    args = ["model=mae_vit_debug", "data.dataset=synthetic", "data.num_workers=0", "epochs=1000",
            "batch_size=8", "vis_every=0", "log_every=1", "device=cpu", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "openmae", "pretrain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert f"stopped by {sig.name} at step" in stdout and "resume=auto" in stdout, stdout
    assert list(out.glob("checkpoint-*.state.pt"))


# ------------------------------------------------------------------------------------------------
# Held-out images for the reconstruction monitor


def test_without_val_path_a_fixed_share_is_held_out_for_the_monitor_and_left_out_of_training(
    tmp_path, capsys
):
    folder = photos(tmp_path / "images", 40, classes=())
    out = tmp_path / "run"
    code = main(["pretrain", "model=mae_vit_debug", "data.num_workers=0", "epochs=1", "vis_every=1",
                 "batch_size=2", f"data.path={folder}", f"output_dir={out}"])  # fmt: skip
    assert code == 0
    assert "holding out 2 of the 40 training images for the reconstruction monitor" in capsys.readouterr().out
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["step"] == 19 and "masked_mse" in epoch  # 38 images trained on, batch 2
    assert (out / "reconstructions-epoch0001.png").exists()
    # Too few to spare: said once.
    small = photos(tmp_path / "small", 6, classes=())
    code = main(["pretrain", "model=mae_vit_debug", "data.num_workers=0", "epochs=1", "vis_every=1",
                 "batch_size=2", f"data.path={small}", f"output_dir={tmp_path / 'run2'}"])  # fmt: skip
    assert code == 0
    assert "the reconstruction monitor (vis_every) is off: no data.val_path" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Files and defaults


def test_weights_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(create_model("mae_vit_debug"), tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_two_epoch_run_with_the_shipped_defaults_lowers_the_loss(tmp_path):
    # The paper's lr (1.5e-4 x 4096 / 256) square-root scaled to the default batch of 64: 3e-4. The
    # linear rule's 3.75e-5 barely moves in 32 steps: the comparison can fail.
    def epoch_losses(*overrides):
        out = tmp_path / str(len(overrides))
        shipped = ["model=mae_vit_debug", "data.dataset=synthetic", "data.num_workers=0", "epochs=2"]
        result = pretrain(load_config(PretrainConfig, overrides=[*shipped, "vis_every=0", f"output_dir={out}",
                                                                 *overrides]))  # fmt: skip
        lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]

    first, second = epoch_losses()
    assert second < first - 0.02, (first, second)
    first, second = epoch_losses("optim.lr_scaling=linear")
    assert second > first - 0.02, (first, second)


# ------------------------------------------------------------------------------------------------
# A user's own dataset


class Labelled(Dataset):
    """Images [3, 32, 32] of two classes a linear layer tells apart (stripes across or down)."""

    num_classes = 2

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, 32, 32, generator=generator) * 0.5
        self.labels = [i % 2 for i in range(size)]
        for i, label in enumerate(self.labels):
            stripes = self.images[i, :, ::4] if label else self.images[i, :, :, ::4]
            stripes += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


@pytest.mark.slow
def test_every_recipe_takes_a_users_dataset(tmp_path, files):
    val = ["data.dataset=synthetic", "data.synthetic_size=8", "data.num_workers=0", "device=cpu"]
    pre = load_config(PretrainConfig, overrides=[*TINY, "batch_size=4", f"output_dir={tmp_path / 'p'}"])
    result = pretrain(pre, dataset=Labelled(16, 0))
    assert result.progress.images_seen == 16
    # The validation images are synthetic (10 classes); the user's have 2 of them.
    encoder = ["checkpoint=none", "model=mae_vit_debug", *val, "epochs=1", "batch_size=4", "num_classes=10"]
    probe = linprobe(load_config(LinprobeConfig, overrides=[*encoder, f"output_dir={tmp_path / 'l'}"]),
                     dataset=Labelled(16, 0))  # fmt: skip
    assert probe.progress.images_seen == 16 and probe.metrics["count"] == 8
    tuned = finetune(load_config(FinetuneConfig, overrides=[*encoder, f"output_dir={tmp_path / 'f'}"]),
                     dataset=Labelled(16, 0))  # fmt: skip
    assert tuned.progress.images_seen == 16
    metrics = knn(load_config(KnnConfig, overrides=["checkpoint=none", "model=mae_vit_debug", *val, "k=3",
                                                    "num_classes=10"]),
                  dataset=Labelled(12, 0))  # fmt: skip
    assert metrics["bank_images"] == 12 and metrics["query_images"] == 8
    # Images of the wrong shape are one error before anything is written.
    with pytest.raises(UsageError, match=r"float tensors \[3, 32, 32\]"):
        knn(load_config(KnnConfig, overrides=["checkpoint=none", "model=mae_vit_debug", *val]),
            dataset=[(torch.zeros(1, 32, 32), 0)])  # fmt: skip
