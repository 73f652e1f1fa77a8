"""Precision paths: bf16 GEMMs as fp32 GEMMs on CPUs without bf16 units, the CPU bf16 attention path,
and the training loop using them."""

from __future__ import annotations

import json

import pytest
import torch

from openmae import hardware
from openmae.config import load_config
from openmae.engine import precision as precision_module
from openmae.engine.precision import Bf16GemmInFp32, autocast, check_precision, gemm_context
from openmae.models import create_model, layers
from openmae.recipes.pretrain import PretrainConfig, pretrain

B = 4


def debug_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=generator), torch.rand(B, 16, generator=generator)


def loss_and_grads(model, imgs, noise, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(imgs, noise=noise).loss
    loss.backward()
    return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.cat([(x - y).flatten().float() for x, y in zip(a, b, strict=True)])
    ref = torch.cat([y.flatten().float() for y in b])
    return float(diff.norm() / ref.norm())


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug").train()


def test_gemm_in_fp32_changes_nothing_in_fp32(model):
    imgs, noise = debug_batch()
    loss, grads = loss_and_grads(model, imgs, noise, bf16=False)
    with Bf16GemmInFp32():
        loss2, grads2 = loss_and_grads(model, imgs, noise, bf16=False)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2, strict=True))


def test_gemm_in_fp32_matches_bf16_autocast(model):
    imgs, noise = debug_batch()
    loss, grads = loss_and_grads(model, imgs, noise, bf16=True)
    with Bf16GemmInFp32():
        loss2, grads2 = loss_and_grads(model, imgs, noise, bf16=True)
    exact, _ = loss_and_grads(model, imgs, noise, bf16=False)
    assert abs(float(loss2 - loss)) < 2e-2 * float(loss)
    assert relative_error(grads2, grads) < 3e-2
    assert abs(float(loss2 - exact)) < 2e-2 * float(exact)  # still a bf16 result of the same model


def test_gemm_in_fp32_rounds_products_to_bf16():
    a = torch.randn(8, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 4, dtype=torch.bfloat16)
    with Bf16GemmInFp32():
        out = a @ b
    assert out.dtype == torch.bfloat16
    expected = (a.double() @ b.double()).to(torch.bfloat16)  # exact products, one rounding
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_gemm_in_fp32_workspace_gives_the_products_of_fresh_widened_copies():
    # Every product, with transposed operands and changing sizes (the buffers are reused and
    # regrown), equals the product of freshly widened copies rounded once: bitwise.
    generator = torch.Generator().manual_seed(0)

    def bf16(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    for m, k, n in [(8, 16, 4), (32, 8, 12), (8, 16, 4)]:
        a, b, bias = bf16(m, k), bf16(n, k).t(), bf16(n)
        a3, b3, bias3 = bf16(3, m, k), bf16(3, n, k).mT, bf16(3, m, n)
        cases = [
            (torch.mm, (a, b), {}),
            (torch.addmm, (bias, a, b), {"beta": 0.5, "alpha": 2.0}),
            (torch.bmm, (a3, b3), {}),
            (torch.baddbmm, (bias3, a3, b3), {}),
        ]
        for fn, args, kwargs in cases:
            with Bf16GemmInFp32():
                out = fn(*args, **kwargs)
            expected = fn(*(t.float() for t in args), **kwargs).to(torch.bfloat16)
            assert out.dtype == torch.bfloat16 and torch.equal(out, expected), fn.__name__


def test_gemm_in_fp32_workspace_stops_growing_once_it_fits():
    a, b = torch.randn(2, 64, 32, dtype=torch.bfloat16), torch.randn(2, 32, 16, dtype=torch.bfloat16)
    with Bf16GemmInFp32():
        torch.bmm(a, b)
        buffers = {name: t.data_ptr() for name, t in precision_module.fp32_workspace().buffers.items()}
        torch.bmm(a[:, :8], b)  # smaller: reuses the same memory
    assert {name: t.data_ptr() for name, t in precision_module.fp32_workspace().buffers.items()} == buffers


def test_cpu_bf16_attention_path_matches_plain_sdpa(model, monkeypatch):
    imgs, noise = debug_batch()
    monkeypatch.setattr(layers, "_slow_low_precision_cpu", lambda x: True)
    loss, grads = loss_and_grads(model, imgs, noise, bf16=True)
    monkeypatch.setattr(layers, "_slow_low_precision_cpu", lambda x: False)
    plain_loss, plain_grads = loss_and_grads(model, imgs, noise, bf16=True)
    assert abs(float(loss - plain_loss)) < 2e-2 * float(plain_loss)
    assert relative_error(grads, plain_grads) < 3e-2


def test_gemm_context_engages_only_for_cpu_bf16_without_matrix_units(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_matrix_units", lambda dtype: False)
    assert isinstance(gemm_context("cpu", "bf16"), Bf16GemmInFp32)
    assert not isinstance(gemm_context("cpu", "bf16", gemm_in_fp32=False), Bf16GemmInFp32)
    assert not isinstance(gemm_context("cpu", "fp32"), Bf16GemmInFp32)
    assert not isinstance(gemm_context("cuda", "bf16"), Bf16GemmInFp32)
    monkeypatch.setattr(hardware, "cpu_has_matrix_units", lambda dtype: True)
    assert not isinstance(gemm_context("cpu", "bf16"), Bf16GemmInFp32)


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


def test_bf16_training_runs_its_matrix_products_through_the_fp32_gemm_path(tmp_path, monkeypatch):
    # Count the products the mode widens, forward and backward, during a short bf16 run.
    monkeypatch.setattr(hardware, "cpu_has_matrix_units", lambda dtype: False)
    widened = []
    original = Bf16GemmInFp32.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        if func in precision_module._GEMMS and precision_module._is_cpu_bf16(args):
            widened.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(Bf16GemmInFp32, "__torch_dispatch__", counting)
    overrides = ["model=mae_vit_debug", "data.dataset=synthetic", "data.synthetic_size=16", "epochs=1",
                 "data.num_workers=0", "batch_size=8", "vis_every=0", "optim.base_lr=0.01"]  # fmt: skip
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(PretrainConfig, overrides=[*overrides, f"precision={precision}",
                                                     f"output_dir={tmp_path / precision}"])  # fmt: skip
        widened.clear()
        runs[precision] = (pretrain(cfg), len(widened))
    (fp32, fp32_products), (bf16, bf16_products) = runs["fp32"], runs["bf16"]
    assert fp32_products == 0 and bf16_products > 0
    assert bf16.progress.step == fp32.progress.step == 2
    fp32_loss, bf16_loss = train_loss(fp32.output_dir), train_loss(bf16.output_dir)
    assert abs(bf16_loss - fp32_loss) < 2e-2 * fp32_loss  # bf16 tolerance of the same training
