"""`accel.norm=recompute`: layer-norm outputs are not kept for backward, and nothing else changes."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from openmae.accel import AccelConfig, Acceleration
from openmae.accel.mlp import recompute_mlps
from openmae.accel.norms import norm_outputs, note_norm_inputs
from openmae.accel.residual import lowp_residual
from openmae.accel.saved import recipes
from openmae.models import create_model


def debug_model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug").train()


def loss_and_grads(model, autocast: bool, recompute: bool):
    torch.manual_seed(1)
    images = torch.randn(4, model.config.in_chans, *model.config.img_size)
    noise = torch.rand(4, model.num_patches)
    model.zero_grad()
    with recipes(norm_outputs) if recompute else torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(images, noise=noise, predict="hidden").loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("residual", ["fp32", "lowp"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recomputed_norms_give_bit_identical_loss_and_gradients(autocast, residual):
    plain = debug_model()
    recompute_mlps(plain)  # the loop's default: its rule nests with this one
    if residual == "lowp":
        lowp_residual(plain)
    lean = copy.deepcopy(plain)
    assert len(note_norm_inputs(lean)) == sum(isinstance(m, nn.LayerNorm) for m in plain.modules()) > 0
    loss, grads = loss_and_grads(plain, autocast, recompute=False)
    lean_loss, lean_grads = loss_and_grads(lean, autocast, recompute=True)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", [False, True])
def test_a_norm_output_is_freed_after_forward_only_when_recomputed(recompute, autocast):
    """What the graph keeps alive after forward: the norm's output (or its bf16 copy) for the
    product's weight gradient, unless recomputed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    note_norm_inputs(model)
    kept = []

    def spy(saved: torch.Tensor):
        kept.append(weakref.ref(saved))
        return norm_outputs(saved) if recompute else None

    x = torch.randn(2, 5, 8, requires_grad=True)
    with recipes(spy), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    gc.collect()
    alive = [t for ref in kept if (t := ref()) is not None and t is not x and t.numel() == x.numel()]
    assert bool(alive) is not recompute  # the norm keeps x itself either way
    y.float().sum().backward()  # and backward still works once it is gone
    assert x.grad is not None and model[0].weight.grad is not None


def test_only_a_whole_norm_output_is_recognised():
    norm = nn.LayerNorm(8)
    note_norm_inputs(norm)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = norm(x)
    assert norm_outputs(y) is not None and norm_outputs(y.view(10, 8)) is not None
    assert norm_outputs(y.to(torch.bfloat16)) is not None  # autocast's copy for a product
    assert norm_outputs(y[:, :2]) is None and norm_outputs(y.transpose(0, 1)) is None
    assert norm_outputs(y * 2) is None and norm_outputs(x) is None
    with torch.no_grad():
        assert norm(x).grad_fn is None  # nothing noted, nothing kept


def test_the_acceleration_recomputes_norms_when_asked():
    def recomputing(norm: str, model: nn.Module) -> bool:
        accel = Acceleration(AccelConfig(cache=False, allocator="system", norm=norm), "cpu", "fp32")
        accel.install(model)
        return accel.recompute_norms

    assert recomputing("recompute", debug_model())
    assert not recomputing("keep", debug_model())
    assert AccelConfig().norm == "keep"  # the default
    assert not recomputing("recompute", nn.Linear(4, 4))  # no norm: no rule
    with pytest.raises(ValueError, match="accel.norm"):
        AccelConfig(norm="drop")


def test_the_training_loop_learns_the_same_with_norms_recomputed():
    """Three steps of the real loop in fp32 and bf16, norms recomputed or kept: the same losses."""
    from openmae.bench.engines import BenchEngine, engine_spec
    from openmae.models.registry import model_config

    for precision in ("fp32", "bf16"):
        losses = {}
        for norm in ("recompute", "keep"):
            spec = engine_spec(f"openmae@attention=sdpa,gemm=native,allocator=system,norm={norm}")
            engine = BenchEngine(spec, model_config("mae_vit_debug"), 4, "cpu", precision)
            assert ("norms" in engine.paths()) is (norm == "recompute")
            losses[norm] = [engine.step().item() for _ in range(3)]
        assert losses["recompute"] == losses["keep"], precision


def test_under_fsdp_or_compile_the_norms_keep_their_outputs_with_a_line_in_the_report():
    accel = Acceleration(AccelConfig(cache=False, allocator="system", norm="recompute"), "cpu", "fp32")
    accel.keep_weight_recipes("under FSDP")
    assert accel.report() == ["accel: norm=recompute is off under FSDP; the products keep the norms' outputs"]
    model = debug_model()
    accel.install(model)
    assert not accel.recompute_norms
    assert not any(m._forward_hooks for m in model.modules() if isinstance(m, nn.LayerNorm))
