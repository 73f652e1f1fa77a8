"""`accel.mlp=recompute`: the GELU output is not kept for backward, and nothing else changes."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from openmae.accel import AccelConfig, Acceleration
from openmae.accel.mlp import RecomputingMlp, recomputable, recompute_mlps
from openmae.models import create_model


def debug_model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug").train()


def inputs(model):
    torch.manual_seed(1)
    images = torch.randn(4, model.config.in_chans, *model.config.img_size)
    return images, torch.rand(4, model.num_patches)


def loss_and_grads(model, images, noise, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(images, noise=noise).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recompute_gives_bit_identical_loss_and_gradients(autocast):
    plain = debug_model()
    lean = copy.deepcopy(plain)
    assert recompute_mlps(lean) == sum(isinstance(m, Mlp) for m in plain.modules()) > 0
    images, noise = inputs(plain)
    loss, grads = loss_and_grads(plain, images, noise, autocast)
    lean_loss, lean_grads = loss_and_grads(lean, images, noise, autocast)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name


def test_state_dict_keys_are_unchanged():
    plain = debug_model()
    lean = copy.deepcopy(plain)
    recompute_mlps(lean)
    assert list(plain.state_dict()) == list(lean.state_dict())
    lean.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("recompute", [False, True])
def test_gelu_output_is_freed_after_forward_only_when_recomputed(recompute):
    """What the graph keeps alive after forward: the GELU output, unless recomputed."""
    torch.manual_seed(0)
    mlp = Mlp(8, 32, act_layer=nn.GELU)
    module = RecomputingMlp(mlp) if recompute else mlp
    outputs = []
    module.act.register_forward_hook(lambda mod, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = module(x)
    gc.collect()
    assert (outputs[0]() is None) == recompute
    y.sum().backward()  # and backward still works once it is gone
    assert x.grad is not None and module.fc1.weight.grad is not None


def test_only_plain_gelu_mlps_are_replaced():
    assert recomputable(Mlp(8, 32, act_layer=nn.GELU))
    assert not recomputable(Mlp(8, 32, act_layer=nn.GELU, drop=0.1))
    assert not recomputable(Mlp(8, 32, act_layer=nn.ReLU))
    assert not recomputable(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="dropout"):
        RecomputingMlp(Mlp(8, 32, drop=0.1))


def test_acceleration_installs_it_by_default_and_not_when_asked_or_checkpointing():
    def mlps_after(cfg: AccelConfig, checkpointing: bool = False):
        model = debug_model()
        model.set_grad_checkpointing(checkpointing)
        Acceleration(cfg, torch.device("cpu"), "fp32").install(model)
        return {type(m) for m in model.modules() if isinstance(m, (Mlp, RecomputingMlp))}

    assert mlps_after(AccelConfig(cache=False)) == {RecomputingMlp}
    assert mlps_after(AccelConfig(mlp="plain", cache=False)) == {Mlp}
    assert mlps_after(AccelConfig(cache=False), checkpointing=True) == {Mlp}
    with pytest.raises(ValueError, match="accel.mlp"):
        AccelConfig(mlp="fast")
