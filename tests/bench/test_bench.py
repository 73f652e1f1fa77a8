"""The speed benchmark: every speed option keeps the loss and gradients, and `mae bench` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from openmae.bench import main
from openmae.bench.engines import ENGINES, BenchEngine, engine_spec, engines_for, step_flops
from openmae.bench.profiling import category
from openmae.bench.run import BenchOptions, _steps_per_repeat, _warm_up, cpu_config, named_configs
from openmae.models import model_config

B = 4


@pytest.mark.slow
def test_compiled_step_matches_eager():
    config = model_config("mae_vit_debug")
    eager = BenchEngine(ENGINES["openmae"], config, B, "cpu", "fp32")
    compiled = BenchEngine(ENGINES["openmae_compile"], config, B, "cpu", "fp32")
    for _ in range(2):
        torch.testing.assert_close(compiled.step(), eager.step(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fair comparison: same weights, same masks.


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engines_start_from_the_same_weights_and_masks(precision):
    config = model_config("mae_vit_debug")
    losses = {}
    for name in (
        "openmae",
        "hf_eager",
        "hf_sdpa",
        "hf_eager_accel",
        "openmae_plain",
        "openmae_predict_all",
        "openmae@attention=eager",
    ):
        losses[name] = float(BenchEngine(engine_spec(name), config, B, "cpu", precision).step())
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for name, loss in losses.items():
        assert loss == pytest.approx(losses["openmae"], rel=tolerance), name


def test_mask_token_baseline_shares_the_encoder_and_decoder():
    config = model_config("mae_vit_debug")
    ours = BenchEngine(ENGINES["openmae"], config, B, "cpu", "fp32").model.state_dict()
    baseline = BenchEngine(ENGINES["mask_tokens"], config, B, "cpu", "fp32").model.state_dict()
    shared = set(ours) & set(baseline)
    assert set(ours) - shared == {"mask_token"} and set(baseline) - shared == {"encoder_mask_token"}
    assert all(torch.equal(ours[k], baseline[k]) for k in shared)


def test_engine_names_and_forced_paths():
    names = ["openmae", "hf_eager", "hf_eager_accel", "openmae@attention=per_head,gemm=fp32", "openmae"]
    assert [s.name for s in engines_for(names, "fp32", "cuda")] == names[:2] + names[3:4]
    assert [s.name for s in engines_for(names, "bf16", "cuda")] == names[:4]  # the GEMM path counts
    assert [s.name for s in engines_for(names, "fp32", "cpu")] == names[:4]  # so does the allocator
    forced = engine_spec("openmae@attention=per_head,gemm=fp32")
    assert (
        forced.accel.attention == "per_head" and forced.accel.gemm == "fp32" and forced.library == "openmae"
    )
    for bad in ("hf_flash", "openmae@attn=eager", "openmae@attention"):
        with pytest.raises(ValueError):
            engine_spec(bad)


def test_an_engine_steps_through_the_training_loop_users_run(monkeypatch):
    from openmae.engine import loop

    steps = []
    original = loop.Trainer.optimizer_step
    monkeypatch.setattr(
        loop.Trainer, "optimizer_step", lambda self, batches: steps.append(1) or original(self, batches)
    )
    engine = BenchEngine(ENGINES["openmae"], model_config("mae_vit_debug"), B, "cpu", "fp32")
    first, second = float(engine.step()), float(engine.step())
    assert len(steps) == 2 and first != second  # new masks (and weights) each step
    assert engine.trainer.progress.step == 2


def test_mask_tokens_in_the_encoder_cost_more_flops():
    config = model_config("mae_vit_debug")
    ours, baseline = step_flops(config), step_flops(config, mask_tokens=True)
    assert 0 < ours < baseline


# ---------------------------------------------------------------------------------------------
# Bookkeeping and the command.


def test_profile_categories():
    assert category("aten::addmm") == "matmul"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("aten::_fused_adamw_") == "optimizer"
    assert category("aten::native_layer_norm_backward") == "layer norm"
    assert category("aten::gather") == "copies, casts, indexing"
    assert category("aten::something_new") == "other ops"


def test_slow_engines_run_fewer_steps_per_repeat():
    assert _steps_per_repeat(0.5, steps=5, max_seconds=30) == 5
    assert _steps_per_repeat(10.0, steps=5, max_seconds=30) == 3
    assert _steps_per_repeat(100.0, steps=5, max_seconds=30) == 1


class SlowFirstStepWorker:
    """A worker whose first step (the build) takes 100 s and every later step 1 s."""

    def __init__(self) -> None:
        self.runs = 0

    def call(self, command: str, **kwargs):
        if command == "build":
            return {"first_loss": 1.0, "first_step_s": 100.0}
        self.runs += kwargs["steps"]
        return 1.0


@pytest.mark.parametrize("name, extra_warmups", [("openmae", 0), ("openmae_compile", 2)])
def test_only_compiled_engines_warm_up_past_a_slow_first_step(name, extra_warmups):
    # A slow first step warms an eager engine; a compiled one spent it compiling.
    worker = SlowFirstStepWorker()
    options = BenchOptions(configs=[], warmup=3, max_repeat_seconds=30)
    config = named_configs(torch.device("cpu"))["tiny"]
    warm = _warm_up(worker, ENGINES[name], config, "fp32", options)
    assert worker.runs == extra_warmups
    assert warm["warm_step_s"] == (1.0 if extra_warmups else 100.0)


def test_bench_runs_end_to_end(tmp_path, bf16_units):
    out = tmp_path / "results"
    argv = [
        "--model", "mae_vit_debug", "--batch", "2", "--precisions", "fp32", "bf16",
        "--peers", "mask_tokens", "hf_eager", "hf_eager_accel", "openmae@attention=eager", "--steps", "2",
        "--warmup", "1", "--repeats", "2", "--in-process", "--peak-size", "128", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "pretrain_speed.jsonl").read_text().splitlines()]
    machine = records[0]
    assert machine["kind"] == "machine" and machine["threads"] == torch.get_num_threads()
    steps = [r for r in records if r["kind"] == "step"]
    both = ("openmae", "mask_tokens", "hf_eager", "hf_eager_accel", "openmae@attention=eager")
    expected = {(p, e) for p in ("fp32", "bf16") for e in both}  # on a CPU the allocator counts in fp32
    assert {(r["precision"], r["engine"]) for r in steps} == expected
    assert machine["cpu_native_bf16"] is bf16_units  # the header says what the CPU has
    ours = [r for r in steps if r["engine"] == "openmae"]
    assert all(r["paths"] for r in ours)  # ...and which paths the loop measured and chose
    attention = [
        chosen for r in ours for entry, chosen in r["paths"].items() if entry.startswith("attention:")
    ]
    assert attention and all(" ms" in chosen.partition(" (")[2] for chosen in attention)  # with timings
    assert all("GELU recomputed" in r["paths"]["mlp"] for r in ours)
    assert not any("mlp" in r["paths"] for r in steps if r["engine"].startswith("hf_"))
    for r in steps:
        assert r["error"] is None
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert len(r["images_per_s_repeats"]) == 2 and r["flops_per_step"] > 0 and r["peak_share"] > 0
    assert {r["precision"] for r in records if r["kind"] == "profile"} == {"fp32", "bf16"}
    assert [r["kind"] for r in records].count("optimizer") == 1
    md = (out / "pretrain_speed.md").read_text()
    for text in (
        "## Targets",
        "threads",
        "transformers",
        "| hf_eager |",
        "fp32: same, HF given openmae's accel (model code alone)",
        "bf16: openmae@attention=eager >= 1.0x fastest HF",  # forced paths face the same bar
        "## Where the time goes",
        "## Execution paths chosen by measurement",
    ):
        assert text in md


@pytest.mark.slow
def test_bench_workers_report_their_own_memory(tmp_path):
    out = tmp_path / "results"
    argv = [
        "--model", "mae_vit_debug", "--batch", "2", "--precisions", "fp32", "--peers", "hf_sdpa",
        "--steps", "1", "--warmup", "1", "--repeats", "1", "--peak-size", "128",
        "--no-profile", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "pretrain_speed.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2
    for r in steps:
        assert r["memory_kind"] == "peak RSS"
        assert r["idle_memory_bytes"] < r["peak_memory_bytes"] < 8 * 2**30


def test_a_slow_product_is_timed_once_per_layout():
    # Native bf16 on a CPU without bf16 units takes seconds a product: the peak measurement must not
    # repeat it (it took 4 minutes of a bench run on an AVX2 EPYC).
    from torch.overrides import TorchFunctionMode

    from openmae.bench.machine import _best_flops

    class CountProducts(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.products = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.products += func is torch.Tensor.matmul  # what `x @ y` reaches a mode as
            return func(*args, **(kwargs or {}))

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    for slow_s, products in ((float("inf"), 3 * 4), (0.0, 3)):
        with CountProducts() as counter:
            flops = _best_flops(a, b, repeats=3, device=torch.device("cpu"), slow_s=slow_s)
        assert counter.products == products and 0 < flops < float("inf")


def test_a_benchmark_scripts_config_is_a_named_one_or_a_model_in_its_place():
    base = named_configs(torch.device("cpu"))["base"]
    assert cpu_config("base") == base
    assert cpu_config("base", batch=4).batch == 4 and cpu_config("base", batch=4).model == base.model
    custom = cpu_config("base", model="mae_vit_debug")
    assert (custom.label, custom.model, custom.batch) == ("mae_vit_debug", "mae_vit_debug", base.batch)
    with pytest.raises(ValueError):
        cpu_config("base", model="mae_vit_nonexistent")
