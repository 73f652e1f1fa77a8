"""k-NN accuracy logged while pretraining (`knn_every`)."""

import json

import pytest

from openmae.cli import main

TINY = [
    "model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=32", "data.num_workers=0",
    "epochs=3", "batch_size=8", "vis_every=0", "device=cpu", "knn_images=16",
]  # fmt: skip


def test_pretraining_logs_knn_accuracy_every_k_epochs_and_after_the_last(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "knn_every=2", f"output_dir={out}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train_loss" in r]
    assert [("knn_top1" in r) for r in epochs] == [False, True, True]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in epochs if "knn_top1" in r)


def test_knn_every_needs_labelled_images(tmp_path, capsys):
    images = tmp_path / "flat"
    images.mkdir()
    from PIL import Image

    for i in range(8):  # a global batch
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(images / f"{i}.png")
    tiny = [arg for arg in TINY if arg != "data.dataset=synthetic"]  # the command line gives a key once
    code = main(["pretrain", *tiny, "knn_every=1", "data.dataset=folder", f"data.path={images}",
                 f"data.val_path={images}", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 2
    assert "labels" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_knn_settings_are_errors(tmp_path, capsys, value):
    assert main(["pretrain", *TINY, f"knn_every={value}", f"output_dir={tmp_path / 'run'}"]) == 2
