"""The speed benchmark: every speed option keeps the loss and gradients, and `mae bench` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.bench import engines, main
from openmae.bench.engines import ENGINES, TrainStep, build_optimizer, engines_for, step_flops
from openmae.bench.profiling import category
from openmae.bench.run import BenchOptions, _steps_per_repeat, _warm_up, named_configs
from openmae.data.jpeg import crop_boxes, decode_crops, draft_crops
from openmae.models import create_model, model_config

B = 4


def test_fused_adamw_matches_foreach():
    # Fixed gradients: real ones include ~0 entries (the key bias gets none), which Adam turns into
    # +-lr steps that flip sign with rounding noise.
    generator = torch.Generator().manual_seed(1)
    states = {}
    for fused in (False, True):
        torch.manual_seed(0)
        m = create_model("mae_vit_debug")
        optimizer = build_optimizer(m, lr=1e-3, fused=fused)
        grads = [
            torch.randn(p.shape, generator=generator.manual_seed(i))
            for i, p in enumerate(optimizer.param_groups[0]["params"])
        ]
        for _ in range(3):
            for p, g in zip(optimizer.param_groups[0]["params"], grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        states[fused] = m.state_dict()
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    config = model_config("mae_vit_debug")
    eager = TrainStep(ENGINES["openmae"], config, B, "cpu", "fp32")
    compiled = TrainStep(ENGINES["openmae_compile"], config, B, "cpu", "fp32")
    for _ in range(2):
        torch.testing.assert_close(compiled(), eager(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fair comparison: same weights, same masks.


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engines_start_from_the_same_weights_and_masks(precision):
    config = model_config("mae_vit_debug")
    losses = {}
    for name in ("openmae", "hf_eager", "hf_sdpa", "hf_eager_gemm32", "openmae_autocast"):
        losses[name] = float(TrainStep(ENGINES[name], config, B, "cpu", precision)())
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for name, loss in losses.items():
        assert loss == pytest.approx(losses["openmae"], rel=tolerance), name


def test_mask_token_baseline_shares_the_encoder_and_decoder():
    config = model_config("mae_vit_debug")
    ours = TrainStep(ENGINES["openmae"], config, B, "cpu", "fp32").model.state_dict()
    baseline = TrainStep(ENGINES["mask_tokens"], config, B, "cpu", "fp32").model.state_dict()
    shared = set(ours) & set(baseline)
    assert set(ours) - shared == {"mask_token"} and set(baseline) - shared == {"encoder_mask_token"}
    assert all(torch.equal(ours[k], baseline[k]) for k in shared)


def test_engines_that_change_nothing_are_dropped(monkeypatch):
    names = ["openmae", "hf_eager", "hf_eager_gemm32", "openmae_autocast", "openmae_compile"]
    assert [s.name for s in engines_for(names, "fp32", "cpu")] == ["openmae", "hf_eager", "openmae_compile"]
    monkeypatch.setattr(engines, "needs_gemm_in_fp32", lambda device, precision: True)  # an AVX2 CPU
    kept = ["openmae", "hf_eager", "hf_eager_gemm32", "openmae_autocast"]
    assert [s.name for s in engines_for(names, "bf16", "cpu")] == kept
    with pytest.raises(ValueError, match="unknown engines"):
        engines_for(["openmae", "hf_flash"], "fp32", "cpu")


def test_mask_tokens_in_the_encoder_cost_more_flops():
    config = model_config("mae_vit_debug")
    ours, baseline = step_flops(config), step_flops(config, mask_tokens=True)
    assert 0 < ours < baseline


# ---------------------------------------------------------------------------------------------
# Input pipeline.


@pytest.fixture
def photo(tmp_path):
    """A smooth 640 x 480 colour JPEG (smooth, so that resampling differences stay small)."""
    y, x = np.mgrid[0:480, 0:640] / 100.0
    rgb = np.stack([np.sin(x), np.cos(y), np.sin(x + y)], axis=-1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(path, quality=95)
    return path


def test_draft_decode_matches_full_decode(photo):
    boxes = [(10, 20, 460, 600), (0, 0, 480, 480)]  # large crops: the decoder may halve the image
    draft = decode_crops(photo, boxes, 112, draft=True)
    full = decode_crops(photo, boxes, 112, draft=False)
    for d, f in zip(draft, full, strict=True):
        assert d.size == f.size == (112, 112)
        diff = np.abs(np.asarray(d, dtype=np.float32) - np.asarray(f, dtype=np.float32))
        assert diff.mean() < 2.0  # out of 255


def test_draft_crops_give_the_views_asked_for(photo):
    torch.manual_seed(0)
    crops = draft_crops(photo, 64, views=3)
    assert [c.size for c in crops] == [(64, 64)] * 3
    with Image.open(photo) as image:
        for top, left, h, w in crop_boxes(image, 20):
            assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
            assert 0.2 * 480 * 640 * 0.99 <= h * w


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


def test_bench_runs_end_to_end(tmp_path, photo, bf16_units):
    out = tmp_path / "results"
    argv = [
        "--model", "mae_vit_debug", "--batch", "2", "--precisions", "fp32", "bf16",
        "--peers", "mask_tokens", "hf_eager", "hf_eager_gemm32", "--steps", "2", "--warmup", "1",
        "--repeats", "2", "--in-process", "--peak-size", "128", "--data-dir", str(photo.parent),
        "--data-items", "2", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "pretrain_speed.jsonl").read_text().splitlines()]
    machine = records[0]
    assert machine["kind"] == "machine" and machine["threads"] == torch.get_num_threads()
    steps = [r for r in records if r["kind"] == "step"]
    expected = {
        ("fp32", "openmae"), ("fp32", "mask_tokens"), ("fp32", "hf_eager"),
        ("bf16", "openmae"), ("bf16", "mask_tokens"), ("bf16", "hf_eager"),
    }  # fmt: skip
    if not bf16_units:  # the fp32-GEMM variant of HF runs only where bf16 GEMMs need it
        expected.add(("bf16", "hf_eager_gemm32"))
    assert {(r["precision"], r["engine"]) for r in steps} == expected
    assert machine["cpu_native_bf16"] is bf16_units
    for r in steps:
        assert r["error"] is None
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert len(r["images_per_s_repeats"]) == 2 and r["flops_per_step"] > 0 and r["peak_share"] > 0
    assert {r["precision"] for r in records if r["kind"] == "profile"} == {"fp32", "bf16"}
    assert [r["kind"] for r in records].count("data") == 1
    assert [r["kind"] for r in records].count("optimizer") == 1
    md = (out / "pretrain_speed.md").read_text()
    for text in (
        "## Targets",
        "threads",
        "transformers",
        "| hf_eager |",
        "## Where the time goes",
        "## Data",
    ):
        assert text in md


@pytest.mark.slow
def test_bench_workers_report_their_own_memory(tmp_path):
    out = tmp_path / "results"
    argv = [
        "--model", "mae_vit_debug", "--batch", "2", "--precisions", "fp32", "--peers", "hf_sdpa",
        "--steps", "1", "--warmup", "1", "--repeats", "1", "--peak-size", "128", "--no-data",
        "--no-profile", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "pretrain_speed.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2
    for r in steps:
        assert r["memory_kind"] == "peak RSS"
        assert r["idle_memory_bytes"] < r["peak_memory_bytes"] < 8 * 2**30
