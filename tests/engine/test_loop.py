"""The training loop, exercised through the pretraining recipe on the debug model and synthetic images."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from openmae.config import load_config
from openmae.engine import budget as budget_module
from openmae.engine import loop
from openmae.engine.budget import TimeBudget
from openmae.models.mae import MaskedAutoencoder
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
    "optim.lr_scaling=linear",  # lr = 0.01 x 8 / 256, which the tests read back
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
    monkeypatch.setattr(
        MaskedAutoencoder,
        "forward_loss",
        staticmethod(lambda pred, target, mask=None: pred.sum() * float("nan")),
    )
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(loop.NonFiniteLossError):
        run(tmp_path, "nan", "max_nonfinite=3")
    assert not list((tmp_path / "nan").glob("checkpoint-*"))


def nan_on_steps(monkeypatch, steps: set[int]) -> None:
    """Make the loss non-finite in the optimizer steps `steps` (1-based), and only there."""
    original = MaskedAutoencoder.forward_loss
    counter = {"calls": 0}

    def forward_loss(pred, target, mask=None):
        counter["calls"] += 1
        loss = original(pred, target, mask)
        return loss * float("nan") if counter["calls"] in steps else loss

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", staticmethod(forward_loss))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])  # skipped on the device (fused) / by the host
def test_exactly_the_steps_with_a_non_finite_loss_are_skipped(tmp_path, monkeypatch, optimizer):
    # Steps 3 and 5 of 8 have a NaN loss: the weights end as those of a run in which those two steps
    # took no update (their gradients zeroed, the optimizer not stepped) and every other step did.
    nan_on_steps(monkeypatch, {3, 5})
    with pytest.warns(UserWarning, match="1 non-finite loss.*before step 4") as caught:
        skipped = run(tmp_path, "nan", f"optim.name={optimizer}", "log_every=4")
    assert skipped.progress.step == 8
    assert any("before step 8" in str(w.message) for w in caught)  # steps 3 and 5, seen at log steps
    weights = load_file(skipped.weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
    monkeypatch.undo()
    # The same run stopped after step 4 (one NaN behind it) and resumed gives the same weights bitwise.
    nan_on_steps(monkeypatch, {3})
    with pytest.warns(UserWarning, match="1 non-finite"):
        run(tmp_path, "split", f"optim.name={optimizer}", "log_every=4", "max_steps=4")
    monkeypatch.undo()
    nan_on_steps(monkeypatch, {1})  # the resumed run's first step is the whole run's fifth
    with pytest.warns(UserWarning, match="1 non-finite"):
        resumed = run(tmp_path, "split", f"optim.name={optimizer}", "log_every=4", "resume=auto")
    resumed_weights = load_file(resumed.weights)
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    monkeypatch.undo()
    clean = load_file(run(tmp_path, "clean", f"optim.name={optimizer}", "log_every=4").weights)
    assert not torch.equal(clean["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


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
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    budget = TimeBudget(minutes=1.0, max_images=100 * 1000, global_batch=10)
    budget.start(step=0)
    plans, planned = [], 0
    for step, now in [(9, 0.9), (10, 1.0), (19, 3.0), (20, 4.0), (39, 50.0)]:
        clock.now = now
        planned = budget.plan(step, images_seen=10 * step, planned_images=planned, epoch_images=1000)
        plans.append(planned)
    # 100 images/s over 59 s left -> 100 + 5900; then 50 images/s over 56 s -> 200 + 2800.
    assert plans == [0, 6000, 6000, 3000, 3000]
    assert budget.next_plan_step == 40
