"""`openmae.accel.saved`: saved tensors kept as recipes (`accel.weight_casts=recompute`) change no
number, free the low-precision weight copies, and refuse a weight changed before backward."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import openmae.accel as accel_module
import openmae.accel.saved as saved
from openmae.accel import AccelConfig, Acceleration
from openmae.accel.mlp import recompute_mlps
from openmae.accel.saved import Recipe, cast_seconds, parameter_casts, recipes
from openmae.accel.tuner import Autotuner
from openmae.engine.precision import autocast
from openmae.models import create_model


@pytest.fixture
def every_weight(monkeypatch):
    """Rebuild weights of any size (the debug model's are all below the default minimum)."""
    monkeypatch.setattr(saved, "MIN_REBUILT_WEIGHT", 0)


def debug_model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug").train()


def loss_and_grads(model, rebuild: bool):
    torch.manual_seed(1)
    images = torch.randn(4, model.config.in_chans, *model.config.img_size)
    noise = torch.rand(4, model.num_patches)
    model.zero_grad()
    with recipes(parameter_casts) if rebuild else contextlib.nullcontext():
        with autocast("cpu", "bf16", cache_weights=not rebuild):
            loss = model(images, noise=noise).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mlp", ["plain", "recompute"])
def test_rebuilt_weight_casts_give_bit_identical_loss_and_gradients(every_weight, mlp):
    plain = debug_model()
    if mlp == "recompute":  # its own rule nests inside the weight rule's hooks
        recompute_mlps(plain)
    rebuilt = copy.deepcopy(plain)
    loss, grads = loss_and_grads(plain, rebuild=False)
    rebuilt_loss, rebuilt_grads = loss_and_grads(rebuilt, rebuild=True)
    assert torch.equal(loss, rebuilt_loss)
    assert grads.keys() == rebuilt_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], rebuilt_grads[name]), name


def spied_rule(seen: list):
    def rule(t):
        recipe = parameter_casts(t)
        if recipe is not None:
            seen.append(recipe)
        return recipe

    return rule


def test_each_linear_weight_is_kept_as_a_recipe_of_the_parameter(every_weight):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    seen: list[Recipe] = []
    with recipes(spied_rule(seen)):
        with autocast("cpu", "bf16", cache_weights=False):
            x = torch.randn(3, 8, requires_grad=True)  # for the first layer's input gradient, too
            out = net(x)
        out.float().sum().backward()
    # x is a leaf as well: its cast is rebuilt the same way
    assert {id(r.source) for r in seen} == {id(net[0].weight), id(net[2].weight), id(x)}
    assert all(r.source.dtype == torch.float32 for r in seen)


def test_fp32_tensors_and_small_weights_are_kept_as_they_are():
    torch.manual_seed(0)
    net = nn.Linear(8, 8)  # 64 weights: below MIN_REBUILT_WEIGHT
    seen: list[Recipe] = []
    for precision in ("fp32", "bf16"):
        with recipes(spied_rule(seen)), autocast("cpu", precision, cache_weights=False):
            net(torch.randn(2, 8)).float().sum().backward()
    assert seen == []


def test_a_weight_changed_in_place_before_backward_is_refused(every_weight):
    net = nn.Linear(8, 8)
    with recipes(parameter_casts):
        with autocast("cpu", "bf16", cache_weights=False):
            out = net(torch.randn(2, 8, requires_grad=True))
        with torch.no_grad():
            net.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="changed in place"):
            out.float().sum().backward()


def test_nested_rules_join_the_outer_hooks_and_leave_with_their_block():
    outer, inner = (lambda t: None), (lambda t: None)
    with recipes(outer):
        with recipes(inner):
            assert saved._open == [outer, inner]
        assert saved._open == [outer]
    assert saved._open is None


def test_acceleration_rebuilds_casts_when_asked_under_autocast_with_large_weights():
    def rebuilding(precision: str, cfg: AccelConfig, model: nn.Module) -> bool:
        accel = Acceleration(cfg, torch.device("cpu"), precision)
        accel.install(model)
        assert accel.autocast_cache is not accel.recast_weights
        return accel.recast_weights

    large = nn.Linear(512, 512)  # 2^18 weights: the smallest that is rebuilt
    asked = AccelConfig(cache=False, allocator="system", weight_casts="recompute")
    assert rebuilding("bf16", asked, large)
    assert not rebuilding("fp32", asked, large)
    kept = AccelConfig(cache=False, allocator="system", weight_casts="keep")
    assert not rebuilding("bf16", kept, large)
    assert rebuilding("bf16", AccelConfig(cache=False, allocator="system"), large)  # auto: from the start
    assert not rebuilding("bf16", asked, debug_model())  # nothing large enough: no hooks at all
    with pytest.raises(ValueError, match="accel.weight_casts"):
        AccelConfig(weight_casts="drop")


def test_the_training_loop_rebuilds_casts_and_learns_the_same(every_weight):
    """Three bf16 steps of the real loop, weight casts rebuilt or kept: the same losses, bit for bit."""
    from openmae.bench.engines import BenchEngine, engine_spec
    from openmae.models.registry import model_config

    forced = "openmae@attention=sdpa,gemm=native,allocator=system"
    losses = {}
    for casts in ("recompute", "keep"):
        engine = BenchEngine(
            engine_spec(f"{forced},weight_casts={casts}"), model_config("mae_vit_debug"), 4, "cpu", "bf16"
        )
        assert engine.trainer.accel.recast_weights is (casts == "recompute")
        assert ("weight casts" in engine.paths()) is (casts == "recompute")
        losses[casts] = [engine.step().item() for _ in range(3)]
    assert losses["recompute"] == losses["keep"]


def test_where_rebuilding_cannot_work_it_is_turned_off_with_a_line_in_the_report():
    accel = Acceleration(
        AccelConfig(cache=False, allocator="system", weight_casts="recompute"), "cpu", "bf16"
    )
    assert accel.recast_weights
    accel.keep_weight_recipes("under FSDP")
    assert not accel.recast_weights and accel.autocast_cache
    assert accel.report() == ["accel: weight_casts=recompute is off under FSDP; autocast keeps its casts"]
    accel.keep_weight_recipes("under torch.compile")  # already off: nothing more to say
    assert accel.report() == []


class SteppingClock:
    """`time.perf_counter` for `openmae.accel`: each read is `step_s` later than the one before."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def perf_counter(self) -> float:
        self.now += self.step_s
        return self.now


@pytest.mark.parametrize(("cast_s", "rebuilt"), [(0.004, True), (0.02, False)])
def test_auto_weight_casts_keep_rebuilding_only_while_it_costs_at_most_a_percent_of_a_step(
    monkeypatch, cast_s, rebuilt
):
    # A step of 1 s: casting the weights once in 4 ms (0.4%) keeps them rebuilt, in 20 ms (2%) not.
    monkeypatch.setattr(accel_module, "time", SteppingClock(1.0))
    measured = []
    monkeypatch.setattr(accel_module, "cast_seconds", lambda weights, dtype: measured.append(dtype) or cast_s)
    accel = Acceleration(AccelConfig(cache=False, allocator="system", gemm="native"), "cpu", "bf16")
    accel.install(nn.Linear(512, 512))
    for _ in range(2):
        accel.after_step()
        assert accel.recast_weights and not measured  # rebuilt until the third step is timed
    accel.after_step()
    assert accel.recast_weights is rebuilt and measured == [torch.bfloat16]
    (line,) = accel.report()
    assert line.startswith(f"accel: weight casts {'rebuilt in backward' if rebuilt else 'kept for backward'}")
    assert f"{cast_s:.1%} of a 1000 ms step" in line
    for _ in range(3):
        accel.after_step()
    assert len(measured) == 1 and accel.report() == []  # decided once
    # A resumed run takes the decision as it was, without measuring.
    resumed = Acceleration(AccelConfig(cache=False, allocator="system", gemm="native"), "cpu", "bf16")
    resumed.install(nn.Linear(512, 512))
    resumed.load_state_dict(accel.state_dict())
    for _ in range(3):
        resumed.after_step()
    assert resumed.recast_weights is rebuilt and len(measured) == 1


def test_a_later_run_on_the_machine_takes_the_weight_cast_decision_from_the_cache(monkeypatch, tmp_path):
    # Near the 1% line the decision could go either way from one run to the next; the first run's
    # stands for the same weights and batch, taken after the first step without measuring.
    monkeypatch.setattr(accel_module, "time", SteppingClock(1.0))
    measured = []
    monkeypatch.setattr(accel_module, "cast_seconds", lambda weights, dtype: measured.append(dtype) or 0.02)
    cache = tmp_path / "autotune.json"

    def run(batch: int, steps: int) -> Acceleration:
        accel = Acceleration(AccelConfig(allocator="system", gemm="native"), "cpu", "bf16", Autotuner(cache))
        model = nn.Linear(512, 512)
        accel.install(model)
        model(torch.zeros(batch, 512))  # the first forward: the batch the decision is for
        for _ in range(steps):
            accel.after_step()
        return accel

    assert not run(4, 3).recast_weights and len(measured) == 1  # 2% of a step: kept
    again = run(4, 1)
    assert not again.recast_weights and again.weight_casts_decided and len(measured) == 1
    assert again.report() == []  # nothing measured, nothing to say
    other_batch = run(8, 3)
    assert len(measured) == 2 and not other_batch.recast_weights  # measured for its own batch


def test_auto_weight_casts_measure_nothing_where_nothing_is_rebuilt(monkeypatch):
    monkeypatch.setattr(accel_module, "cast_seconds", lambda weights, dtype: pytest.fail("measured"))
    for precision, model in (("fp32", nn.Linear(512, 512)), ("bf16", debug_model())):
        accel = Acceleration(AccelConfig(cache=False, allocator="system", gemm="native"), "cpu", precision)
        accel.install(model)
        for _ in range(3):
            accel.after_step()
        assert not accel.recast_weights and "weight casts" not in accel.state_dict()
    under_fsdp = Acceleration(AccelConfig(cache=False, allocator="system", gemm="native"), "cpu", "bf16")
    under_fsdp.install(nn.Linear(512, 512))
    under_fsdp.keep_weight_recipes("under FSDP")
    for _ in range(3):
        under_fsdp.after_step()
    assert not under_fsdp.recast_weights and under_fsdp.report() == []  # auto was not asked: no line


def test_cast_seconds_times_the_casts():
    weights = [nn.Parameter(torch.randn(512, 512)) for _ in range(2)]
    assert 0 < cast_seconds(weights, torch.bfloat16) < 1
