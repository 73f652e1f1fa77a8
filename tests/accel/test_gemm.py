"""bf16 matrix products on the CPU: native or as exact fp32 GEMMs, chosen per call shape by measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openmae.accel import gemm as gemm_module
from openmae.accel.gemm import Bf16Gemm, Product
from openmae.accel.saved import parameter_casts, recipes
from openmae.accel.tuner import Autotuner, Scouted
from openmae.models import create_model

bf16 = torch.bfloat16


class FavourTimer:
    def __init__(self, fastest: str) -> None:
        self.fastest, self.keys = fastest, []

    def __call__(self, candidates, keys_timed=None, handicaps=None):
        self.keys.append(sorted(candidates))
        for run in candidates.values():
            run()
        return {name: 1.0 if name == self.fastest else 2.0 for name in candidates}


def rand(*shape, generator, dtype=bf16):
    return torch.randn(*shape, generator=generator).to(dtype)


def count_widened(monkeypatch) -> list[str]:
    widened = []
    original = Product.widened
    monkeypatch.setattr(Product, "widened", lambda self: widened.append(self.kind) or original(self))
    return widened


def products(generator):
    """(name, function, operands) of every kind of product the mode widens, with transposed operands."""
    a, w = rand(6, 5, 16, generator=generator), rand(12, 16, generator=generator)
    bias = rand(12, generator=generator)
    q, k = rand(2, 3, 7, 8, generator=generator), rand(2, 3, 7, 8, generator=generator)
    img, kernel = rand(2, 3, 8, 8, generator=generator), rand(4, 3, 4, 4, generator=generator)
    return [
        ("linear", lambda x, w, b: F.linear(x, w, b), [a, w, bias]),
        ("linear, no bias", lambda x, w: F.linear(x, w), [a, w]),
        ("matmul 4-d, transposed", lambda q, k: q @ k.transpose(-2, -1), [q, k]),
        ("bmm", torch.bmm, [q[0], k[0].mT]),
        ("mm, transposed", torch.mm, [a[0], w.t()]),
        ("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=4), [img, kernel, rand(4, generator=generator)]),
    ]


def forward_and_grads(fn, operands, context):
    leaves = [t.detach().clone().requires_grad_() for t in operands]
    with context:
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
    return out, [t.grad for t in leaves]


def test_the_fp32_path_is_the_product_of_widened_values_rounded_once_forward_and_backward():
    # Forward: bitwise the fp32 product of the bf16 values, rounded once. Backward: every gradient is
    # the fp32 product of bf16 values rounded once too, so it equals the native bf16 kernel's within
    # one bf16 rounding (the native kernel rounds the same exact sums, in another order).
    generator = torch.Generator().manual_seed(0)
    for name, fn, operands in products(generator):
        out, grads = forward_and_grads(fn, operands, Bf16Gemm(Autotuner(), path="fp32"))
        expected = fn(*(t.float() for t in operands)).to(bf16)
        assert out.dtype == bf16 and torch.equal(out, expected), name
        native_out, native_grads = forward_and_grads(fn, operands, Bf16Gemm(Autotuner(), path="native"))
        for grad, native in zip(grads, native_grads, strict=True):
            assert grad.dtype == bf16 and grad.shape == native.shape, name
            torch.testing.assert_close(grad.float(), native.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_under_autocast_fp32_weights_get_fp32_gradients_through_their_casts():
    generator = torch.Generator().manual_seed(1)
    x = rand(4, 16, generator=generator, dtype=torch.float32)
    layer = torch.nn.Linear(16, 8)
    grads = {}
    for path in ("native", "fp32"):
        layer.zero_grad(set_to_none=True)
        with Bf16Gemm(Autotuner(), path=path):
            with torch.autocast("cpu", dtype=bf16):
                out = layer(x)
            out.float().square().sum().backward()
        assert out.dtype == bf16 and layer.weight.grad.dtype == torch.float32
        grads[path] = layer.weight.grad.clone()
    torch.testing.assert_close(grads["fp32"], grads["native"], rtol=2e-2, atol=2e-2)


def test_fp32_products_and_broadcasting_pass_through(monkeypatch):
    widened = count_widened(monkeypatch)
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with Bf16Gemm(Autotuner(), path="fp32"):
        a @ b  # fp32 outside autocast: not a bf16 product
        torch.randn(2, 3, 8, 16, dtype=bf16) @ torch.randn(16, 4, dtype=bf16)  # broadcast: native
        torch.randn(16, dtype=bf16) @ torch.randn(16, dtype=bf16)  # vectors: native
        F.conv2d(torch.randn(1, 3, 8, 8, dtype=bf16), torch.randn(4, 3, 3, 3, dtype=bf16), padding="same")
    assert widened == []


def test_the_workspace_stops_growing_once_it_fits():
    a, b = torch.randn(2, 64, 32, dtype=bf16), torch.randn(2, 32, 16, dtype=bf16)
    with Bf16Gemm(Autotuner(), path="fp32"):
        torch.bmm(a, b)
        buffers = {name: t.data_ptr() for name, t in gemm_module.fp32_workspace().buffers.items()}
        torch.bmm(a[:, :8], b)  # smaller: reuses the same memory
    assert {name: t.data_ptr() for name, t in gemm_module.fp32_workspace().buffers.items()} == buffers


@pytest.mark.parametrize("fastest", ["native", "fp32"])
def test_each_product_shape_takes_the_path_measured_fastest(fastest, monkeypatch):
    widened = count_widened(monkeypatch)
    timer = FavourTimer(fastest)
    mode = Bf16Gemm(Autotuner(timer=timer))
    a = torch.randn(8, 16, dtype=bf16, requires_grad=True)
    b = torch.randn(16, 4, dtype=bf16)
    with mode:
        first = a @ b
        widened.clear()
        second = a @ b  # measured already: one run of the chosen path
        (a @ b).sum().backward()
        with torch.no_grad():
            a @ b  # without gradients: another key, measured forward only
    assert timer.keys == [["fp32", "native"], ["fp32", "native"]]
    keys = list(mode.keys.values())
    assert keys[0].endswith("fwd+bwd") and keys[1].endswith(" fwd")
    assert len(widened) == (3 if fastest == "fp32" else 0)
    assert torch.equal(first, second) and a.grad.shape == a.shape


@pytest.mark.parametrize("path", ["native", "fp32"])
def test_a_model_trains_alike_on_either_forced_path(path):
    torch.manual_seed(0)
    model = create_model("mae_vit_debug").train()
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)

    def loss_and_grads(context):
        model.zero_grad(set_to_none=True)
        with context:
            with torch.autocast("cpu", dtype=bf16):
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


def test_widened_linears_keep_weight_casts_recomputable(monkeypatch):
    # The widened linear receives autocast-style casts of its weights, so `weight_casts=recompute`
    # recognises them: backward rebuilds them, and the gradients do not change at all.
    monkeypatch.setattr("openmae.accel.saved.MIN_REBUILT_WEIGHT", 1)
    rebuilt = []
    cast = lambda p, dtype: rebuilt.append(p) or p.detach().to(dtype)
    monkeypatch.setattr("openmae.accel.saved._cast", cast)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)

    def weight_grad(context):
        layer.zero_grad(set_to_none=True)
        with Bf16Gemm(Autotuner(), path="fp32"), context:
            with torch.autocast("cpu", dtype=bf16):
                out = layer(x)
            out.float().sum().backward()
        return layer.weight.grad.clone()

    kept = weight_grad(recipes())
    assert rebuilt == []
    recast = weight_grad(recipes(parameter_casts))
    assert any(p is layer.weight for p in rebuilt) and torch.equal(recast, kept)


@pytest.mark.parametrize(
    ("kind", "shapes", "scale", "cut"),
    [
        ("linear", [(4, 100, 16), (8, 16), (8,)], 25.0, [(16, 16), (8, 16), (8,)]),  # 400 rows -> 16
        ("matmul", [(600, 16), (16, 8)], 600 / 16, [(16, 16), (16, 8)]),
        ("matmul", [(6, 3, 7, 8), (6, 3, 8, 5)], 6.0, [(1, 3, 7, 8), (1, 3, 8, 5)]),  # a stack: one entry
        ("conv2d", [(4, 3, 8, 8), (2, 3, 4, 4), (2,)], 4.0, [(1, 3, 8, 8), (2, 3, 4, 4), (2,)]),
    ],
)
def test_a_native_product_is_sized_up_on_a_slice_of_its_work(kind, shapes, scale, cut):
    operands = [torch.randn(*shape, dtype=bf16, requires_grad=True) for shape in shapes]
    if kind == "matmul":
        operands[1] = operands[1].detach().mT.contiguous().mT.requires_grad_()  # read transposed
    product = Product(kind, operands, ((4, 4), (0, 0), (1, 1), 1) if kind == "conv2d" else ())
    sliced, found = product.scout_operands(operands)
    assert found == scale and [tuple(t.shape) for t in sliced] == cut
    for full, part in zip(operands, sliced, strict=True):
        leading = full.reshape(-1, full.shape[-1]) if kind == "linear" and full.dim() > 2 else full
        assert torch.equal(part, leading[: part.shape[0]]) and part.requires_grad
        assert gemm_module._transposed(part) == gemm_module._transposed(full)
    with torch.autocast("cpu", dtype=bf16):
        runs = product.timing_runs()
    assert isinstance(runs["native"], Scouted) and runs["native"].scale == scale
    runs["native"].scout()  # the same product, forward and backward, on the slice
    doubled, half_scale = product.scout_operands(operands, slices=2)
    assert half_scale == pytest.approx(scale / 2) and doubled[0].shape[0] == 2 * sliced[0].shape[0]
    runs["native"].wider()  # and on twice the slice, which tells fixed costs from the work's
    assert not isinstance(runs["fp32"], Scouted)


@pytest.mark.parametrize("rows", [12, 0])
def test_a_product_of_few_rows_is_not_scouted(rows):
    x, weight = torch.randn(rows, 16, dtype=bf16, requires_grad=True), torch.randn(8, 16, dtype=bf16)
    product = Product("linear", [x, weight, None])
    runs = product.timing_runs()
    assert not isinstance(runs["native"], Scouted)
    runs["native"]()
