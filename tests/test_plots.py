"""`mae plot` and the `curves.png` every run writes: loss, lr and monitor metrics, runs overlaid."""

import json

import numpy as np
from PIL import Image

from openmae.cli import main
from openmae.plots import read_curves

RUN = ["model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=16", "data.num_workers=0",
       "epochs=2", "batch_size=4", "log_every=1", "vis_every=1", "eval_images=8"]  # fmt: skip


def colours(path) -> set:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(p) for p in pixels}


def test_every_run_draws_its_curves_and_plot_overlays_two_runs(tmp_path, capsys):
    for name, lr in (("slow", "1e-4"), ("fast", "1e-3")):
        assert main(["pretrain", *RUN, f"optim.lr={lr}", f"output_dir={tmp_path / name}"]) == 0
        assert Image.open(tmp_path / name / "curves.png").format == "PNG"
    out = tmp_path / "compare.png"
    assert main(["plot", str(tmp_path / "slow"), str(tmp_path / "fast"), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.size == (1200, 720)  # 2 x 2 panels: loss, lr, masked MSE
    one = colours(tmp_path / "slow" / "curves.png")
    assert (31, 119, 180) in one and (255, 127, 14) not in one  # one run: matplotlib's first colour only
    assert {(31, 119, 180), (255, 127, 14)} <= colours(out)  # two runs: the first two colours


def test_a_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 0.1},
        {"step": 2, "epoch": 1, "train_loss": 1.9},
        {"step": 2, "epoch": 1.0, "loss": 1.8, "lr": 0.1},
        {"step": 2, "epoch": 1.0, "loss": 1.7, "lr": 0.1},  # logged again after a resume from step 1
    ]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"step": 3, "lo')
    curves = read_curves(run)
    assert [r["loss"] for r in curves.steps] == [2.0, 1.7] and len(curves.epochs) == 1
