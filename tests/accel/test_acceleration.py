"""The loop's fast paths as one object: installed kernels, the step context, and the measured decision
to keep or drop the bf16 GEMM dispatch mode."""

from __future__ import annotations

import pytest
import torch

from openmae.accel import AccelConfig, Acceleration
from openmae.accel import gemm as gemm_module
from openmae.accel.tuner import Autotuner


class FixedTimer:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def __call__(self, candidates, keys_timed=None, handicaps=None):
        return {name: self.seconds[name] for name in candidates}


def run_steps(accel: Acceleration, steps: int) -> None:
    a, b = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    for _ in range(steps):
        with accel.step():
            for _ in range(3):
                a @ b
        accel.after_step()


def accel_with(seconds: dict[str, float], overhead_s: float, monkeypatch) -> Acceleration:
    monkeypatch.setattr("openmae.accel.dispatch_overhead_s", lambda: overhead_s)
    tuner = Autotuner(timer=FixedTimer(seconds))
    return Acceleration(AccelConfig(cache=False), torch.device("cpu"), "bf16", tuner=tuner)


@pytest.mark.parametrize(
    ("seconds", "overhead_s", "mode"),
    [
        ({"native": 8e-3, "fp32": 1e-3}, 1e-6, "on"),  # fp32 products save far more than dispatch costs
        ({"native": 1e-3, "fp32": 2e-3}, 1e-6, "off"),  # native wins: nothing to save
        ({"native": 1.1e-3, "fp32": 1e-3}, 1e-3, "off"),  # a small saving, eaten by the dispatch cost
    ],
)
def test_the_gemm_mode_stays_only_where_it_saves_more_than_it_costs(monkeypatch, seconds, overhead_s, mode):
    accel = accel_with(seconds, overhead_s, monkeypatch)
    run_steps(accel, 2)
    assert accel.gemm_mode == mode
    assert accel.state_dict()["bf16 gemm:dispatch"] == mode
    lines = accel.report()
    assert any(f"dispatch {mode}" in line for line in lines)
    calls = []

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return func(*args, **(kwargs or {}))

    # The fp32 workspace that measuring filled is freed where no product will run widened.
    assert bool(gemm_module.fp32_workspace().buffers) == (mode == "on")
    monkeypatch.setattr(gemm_module.Bf16Gemm, "__torch_function__", counting)
    with accel.step():  # "off": the step runs without the mode at all
        torch.zeros(2) + 1
    assert bool(calls) == (mode == "on")


@pytest.mark.parametrize(("native_s", "advised"), [(8e-3, True), (0.5e-3, False)])
def test_a_cpu_whose_products_are_all_slower_in_bf16_is_told_that_fp32_is_faster(
    monkeypatch, native_s, advised
):
    accel = accel_with({"native": native_s, "fp32": 1e-3}, 1e-6, monkeypatch)
    run_steps(accel, 3)
    lines = accel.report()
    assert ("precision=fp32 may well train faster" in " ".join(lines)) == advised
    run_steps(accel, 3)
    assert not any("precision=fp32" in line for line in accel.report())  # said once


def test_a_resumed_run_keeps_the_decision(monkeypatch):
    first = accel_with({"native": 8e-3, "fp32": 1e-3}, 1e-6, monkeypatch)
    run_steps(first, 2)
    second = accel_with({"native": 1e-3, "fp32": 8e-3}, 1e-6, monkeypatch)
    second.load_state_dict(first.state_dict())
    run_steps(second, 3)
    assert second.gemm_mode == "on" and second.state_dict() == first.state_dict()


def test_a_second_run_on_the_machine_keeps_the_first_runs_decision(monkeypatch, tmp_path):
    # The decision weighs two measured costs; where they are close, a fresh measurement could go
    # the other way and the second run would compute differently. The cache file settles it.
    cache = tmp_path / "autotune.json"
    monkeypatch.setattr("openmae.accel.dispatch_overhead_s", lambda: 1e-6)
    first = Acceleration(
        AccelConfig(),
        torch.device("cpu"),
        "bf16",
        tuner=Autotuner(cache, FixedTimer({"native": 8e-3, "fp32": 1e-3})),
    )
    run_steps(first, 2)
    assert first.gemm_mode == "on" and any("dispatch on" in line for line in first.report())
    monkeypatch.setattr("openmae.accel.dispatch_overhead_s", lambda: 1.0)  # would now say "off"
    second = Acceleration(AccelConfig(), torch.device("cpu"), "bf16", tuner=Autotuner(cache, FixedTimer({})))
    run_steps(second, 2)
    assert second.gemm_mode == "on" and not any("dispatch" in line for line in second.report())
    third = Acceleration(
        AccelConfig(),
        torch.device("cpu"),
        "bf16",
        tuner=Autotuner(None, FixedTimer({"native": 8e-3, "fp32": 1e-3})),
    )
    run_steps(third, 2)  # without the cache: measured again
    assert third.gemm_mode == "off"


def test_fp32_and_native_forced_need_no_decision(monkeypatch):
    forced = Acceleration(AccelConfig(gemm="fp32", cache=False), torch.device("cpu"), "bf16")
    run_steps(forced, 3)
    assert forced.gemm_mode == "on"
    native = Acceleration(AccelConfig(gemm="native", cache=False), torch.device("cpu"), "bf16")
    assert native.gemm is None and "bf16 gemm:dispatch" not in native.state_dict()
    fp32_run = Acceleration(AccelConfig(cache=False), torch.device("cpu"), "fp32")
    assert fp32_run.gemm is None  # nothing to decide for an fp32 run


def test_the_dispatch_overhead_is_measured_positive():
    assert 0 <= gemm_module.dispatch_overhead_s() < 1e-3
