"""bf16 matrix products on the CPU: native or as exact fp32 GEMMs, chosen per shape by measurement."""

from __future__ import annotations

import pytest
import torch

from openmae.accel import gemm as gemm_module
from openmae.accel.gemm import Bf16Gemm, as_fp32
from openmae.accel.tuner import Autotuner
from openmae.models import create_model


class FavourTimer:
    def __init__(self, fastest: str) -> None:
        self.fastest, self.keys = fastest, 0

    def __call__(self, candidates):
        self.keys += 1
        for run in candidates.values():
            run()
        return {name: 1.0 if name == self.fastest else 2.0 for name in candidates}


def bf16(*shape, generator):
    return torch.randn(*shape, generator=generator).to(torch.bfloat16)


def test_the_fp32_path_gives_the_products_of_fresh_widened_copies_rounded_once():
    # Every product, with transposed operands and changing sizes (the workspace buffers are reused
    # and regrown), equals the product of freshly widened copies rounded once: bitwise.
    generator = torch.Generator().manual_seed(0)
    for m, k, n in [(8, 16, 4), (32, 8, 12), (8, 16, 4)]:
        a, b, bias = (
            bf16(m, k, generator=generator),
            bf16(n, k, generator=generator).t(),
            bf16(n, generator=generator),
        )
        a3, b3 = bf16(3, m, k, generator=generator), bf16(3, n, k, generator=generator).mT
        bias3 = bf16(3, m, n, generator=generator)
        cases = [
            (torch.mm, (a, b), {}),
            (torch.addmm, (bias, a, b), {"beta": 0.5, "alpha": 2.0}),
            (torch.bmm, (a3, b3), {}),
            (torch.baddbmm, (bias3, a3, b3), {}),
        ]
        for fn, args, kwargs in cases:
            with Bf16Gemm(Autotuner(), path="fp32"):
                out = fn(*args, **kwargs)
            expected = fn(*(t.float() for t in args), **kwargs).to(torch.bfloat16)
            assert out.dtype == torch.bfloat16 and torch.equal(out, expected), fn.__name__


def test_the_workspace_stops_growing_once_it_fits():
    a, b = torch.randn(2, 64, 32, dtype=torch.bfloat16), torch.randn(2, 32, 16, dtype=torch.bfloat16)
    with Bf16Gemm(Autotuner(), path="fp32"):
        torch.bmm(a, b)
        buffers = {name: t.data_ptr() for name, t in gemm_module.fp32_workspace().buffers.items()}
        torch.bmm(a[:, :8], b)  # smaller: reuses the same memory
    assert {name: t.data_ptr() for name, t in gemm_module.fp32_workspace().buffers.items()} == buffers


@pytest.mark.parametrize("fastest", ["native", "fp32"])
def test_each_product_shape_takes_the_path_measured_fastest(fastest, monkeypatch):
    widened = []
    monkeypatch.setattr(
        gemm_module, "as_fp32", lambda func, args, kwargs: widened.append(func) or as_fp32(func, args, kwargs)
    )
    timer = FavourTimer(fastest)
    mode = Bf16Gemm(Autotuner(timer=timer))
    a, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    with mode:
        first = a @ b
        widened.clear()
        second = a @ b  # measured already: one run of the chosen path
        a.float() @ b.float()  # fp32 products pass through untouched
    assert timer.keys == 1 and len(widened) == (1 if fastest == "fp32" else 0)
    assert torch.equal(first, second) or fastest == "native"


@pytest.mark.parametrize("path", ["native", "fp32"])
def test_a_model_trains_alike_on_either_forced_path(path):
    torch.manual_seed(0)
    model = create_model("mae_vit_debug").train()
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)

    def loss_and_grads(context):
        model.zero_grad(set_to_none=True)
        with context:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(imgs, noise=noise).loss
            loss.backward()
        return loss.detach().float(), torch.cat(
            [p.grad.flatten().float() for p in model.parameters() if p.requires_grad]
        )

    loss, grads = loss_and_grads(Bf16Gemm(Autotuner(), path=path))
    ref_loss, ref_grads = loss_and_grads(torch.autocast("cpu", enabled=False))  # autocast, plain bf16 GEMMs
    assert abs(float(loss - ref_loss)) < 2e-2 * float(ref_loss)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < 3e-2
    with pytest.raises(ValueError, match="accel.gemm must be one of"):
        Bf16Gemm(Autotuner(), path="fp16")
