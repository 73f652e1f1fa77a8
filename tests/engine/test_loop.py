"""The training loop, exercised through the pretraining recipe on the debug model and synthetic images."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from openmae.config import load_config
from openmae.engine import loop
from openmae.engine.loop import Progress, Trainer
from openmae.recipes.pretrain import PretrainConfig, pretrain

TINY_RUN = [
    "model=mae_vit_debug",
    "data.dataset=synthetic",
    "data.synthetic_size=32",
    "data.num_workers=0",
    "epochs=2",
    "batch_size=8",
    "vis_every=0",
    "log_every=1",
    "optim.warmup_epochs=0.5",
    "optim.base_lr=0.01",
]


def run(tmp_path, name, *overrides):
    cfg = load_config(PretrainConfig, overrides=[*TINY_RUN, f"output_dir={tmp_path / name}", *overrides])
    return pretrain(cfg)


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(tmp_path):
    straight = run(tmp_path, "straight")
    assert straight.progress.step == 8
    stopped = run(tmp_path, "split", "max_steps=3")
    assert stopped.progress.step == 3
    resumed = run(tmp_path, "split", "resume=auto")
    assert resumed.progress.step == 8
    a, b = load_file(straight.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ...and a run that did not replay the same data would differ.
    other = run(tmp_path, "other_seed", "seed=1")
    assert not torch.equal(
        load_file(other.weights)["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"]
    )


def test_run_writes_config_metrics_checkpoints_and_keeps_the_last_k(tmp_path):
    result = run(tmp_path, "run", "keep_last=1", "save_every=1")
    out = result.output_dir
    assert (out / "config.yaml").exists()
    saved = load_config(PretrainConfig, out / "config.yaml")
    assert saved.batch_size == 8 and saved.data.dataset == "synthetic"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 8 and all(line["lr"] >= 0 for line in steps)
    assert any("train_loss" in line for line in lines)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-00000008.safetensors",
        "checkpoint-00000008.state.pt",
    ]
    state = torch.load(out / "checkpoint-00000008.state.pt", weights_only=True)
    assert state["progress"]["images_seen"] == 64


def test_lr_follows_warmup_then_cosine_in_the_logs(tmp_path):
    result = run(tmp_path, "lr")
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [line["lr"] for line in lines if "lr" in line]
    peak = 0.01 * 8 / 256
    # 64 images in all, 16 of warm-up: steps see 0, 8, 16, ... images before stepping.
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(peak / 2)
    assert lrs[2] == pytest.approx(peak)
    assert lrs[-1] < lrs[3] < peak


def test_non_finite_losses_skip_steps_then_stop_the_run(tmp_path, monkeypatch):
    from openmae.engine import loop
    from openmae.models.mae import MaskedAutoencoder

    monkeypatch.setattr(
        MaskedAutoencoder, "forward_loss", staticmethod(lambda pred, target, mask: pred.sum() * float("nan"))
    )
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(loop.NonFiniteLossError):
        run(tmp_path, "nan", "max_nonfinite=3")
    assert not list((tmp_path / "nan").glob("checkpoint-*"))


def test_a_time_budget_shortens_the_schedule_after_calibration(tmp_path):
    result = run(tmp_path, "budget", "batch_size=2", "epochs=3", "time_budget_min=0.00001")
    # Calibration takes 10 steps; the budget is then spent, so the run ends there with a checkpoint.
    assert result.progress.step == 10
    assert result.progress.planned_images == 20
    assert result.weights.exists() and (result.output_dir / "checkpoint-00000010.safetensors").exists()


def test_a_time_budget_is_replanned_as_the_measured_speed_changes(monkeypatch):
    # The plan after 10 steps assumes the first rate; when steps then slow down, the re-plan at step
    # 20 follows the rate measured since the start. A fake clock keeps the numbers exact.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(time_budget_min=1.0, epochs=100),
        progress=Progress(),
        dist=SimpleNamespace(world_size=1, is_main=False),
        epoch_images=1000,
        global_batch=10,
        run_started=0.0,
        first_step=0,
        next_plan_step=10,
    )
    plans = []
    for step, now in [(9, 0.9), (10, 1.0), (19, 3.0), (20, 4.0), (39, 50.0)]:
        trainer.progress.step, trainer.progress.images_seen, clock.now = step, 10 * step, now
        Trainer.plan_time_budget(trainer)
        plans.append(trainer.progress.planned_images)
    # 100 images/s over 59 s left -> 100 + 5900; then 50 images/s over 56 s -> 200 + 2800.
    assert plans == [0, 6000, 6000, 3000, 3000]
    assert trainer.next_plan_step == 40
