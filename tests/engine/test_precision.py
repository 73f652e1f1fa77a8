"""Precision: the autocast contexts, and bf16 training through the loop on each bf16 GEMM path."""

from __future__ import annotations

import json

import pytest
import torch

from openmae.accel import gemm as gemm_module
from openmae.config import load_config
from openmae.engine.precision import autocast, check_precision
from openmae.recipes.pretrain import PretrainConfig, pretrain


def test_precision_checks_and_autocast_dtypes():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp64", "cpu")
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def train_loss(run_dir) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r][-1]


def test_bf16_training_takes_the_gemm_path_it_is_given_and_matches_fp32(tmp_path, monkeypatch):
    # Count the products computed as fp32 GEMMs, forward and backward, during short bf16 runs.
    widened = []
    original = gemm_module.Product.widened
    counting = lambda self: widened.append(self.kind) or original(self)
    monkeypatch.setattr(gemm_module.Product, "widened", counting)
    overrides = ["model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=16", "epochs=1",
                 "data.num_workers=0", "batch_size=8", "vis_every=0", "optim.base_lr=0.01",
                 "optim.lr_scaling=linear"]  # fmt: skip
    runs = {}
    paths = {
        "fp32": ["precision=fp32"],
        "bf16 fp32-gemm": ["precision=bf16", "accel.gemm=fp32"],
        "bf16 native": ["precision=bf16", "accel.gemm=native"],
    }
    for name, extra in paths.items():
        cfg = load_config(PretrainConfig, overrides=[*overrides, *extra, f"output_dir={tmp_path / name}"])
        widened.clear()
        result = pretrain(cfg)
        runs[name] = (result, len(widened))
    assert runs["fp32"][1] == 0 and runs["bf16 native"][1] == 0 and runs["bf16 fp32-gemm"][1] > 0
    fp32_loss = train_loss(runs["fp32"][0].output_dir)
    for name in ("bf16 fp32-gemm", "bf16 native"):
        assert runs[name][0].progress.step == 2
        assert abs(train_loss(runs[name][0].output_dir) - fp32_loss) < 2e-2 * fp32_loss, name
