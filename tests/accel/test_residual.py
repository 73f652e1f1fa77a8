"""`accel.residual=lowp`: the residual stream in the autocast dtype, close to plain autocast, and
nothing changed outside autocast."""

from __future__ import annotations

import pytest
import torch

from openmae.accel import AccelConfig, Acceleration
from openmae.accel.residual import lowp_residual
from openmae.models import create_model
from openmae.models.layers import Block


def debug_model():
    torch.manual_seed(0)
    return create_model("mae_vit_debug").train()


def loss_and_grads(model, images, noise, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(images, noise=noise).loss
    loss.backward()
    return loss.detach().float(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def inputs(model):
    torch.manual_seed(1)
    images = torch.randn(4, model.config.in_chans, *model.config.img_size)
    return images, torch.rand(4, model.num_patches)


def block_input_dtypes(model, images, noise, autocast: bool) -> set[tuple[torch.dtype, torch.dtype]]:
    """The (input, output) dtypes every Block saw in one forward pass."""
    seen = set()
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.add((args[0].dtype, out.dtype)))
        for m in model.modules()
        if isinstance(m, Block)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(images, noise=noise)
    for hook in hooks:
        hook.remove()
    return seen


def test_lowp_blocks_read_and_write_the_autocast_dtype():
    model = debug_model()
    images, noise = inputs(model)
    assert block_input_dtypes(model, images, noise, autocast=True) == {(torch.float32, torch.float32)}
    lowp_residual(model)
    assert block_input_dtypes(model, images, noise, autocast=True) == {(torch.bfloat16, torch.bfloat16)}


def test_lowp_is_close_to_plain_autocast():
    model = debug_model()
    images, noise = inputs(model)
    plain_loss, plain_grads = loss_and_grads(model, images, noise, autocast=True)
    hooks = lowp_residual(model)
    loss, grads = loss_and_grads(model, images, noise, autocast=True)
    assert loss != plain_loss  # the stream is rounded: not the same computation
    torch.testing.assert_close(loss, plain_loss, rtol=2e-2, atol=0)
    flat = torch.cat([g.flatten().float() for g in grads.values()])
    plain_flat = torch.cat([g.flatten().float() for g in plain_grads.values()])
    assert torch.nn.functional.cosine_similarity(flat, plain_flat, dim=0) > 0.99
    for hook in hooks:
        hook.remove()
    again_loss, _ = loss_and_grads(model, images, noise, autocast=True)
    assert again_loss == plain_loss  # the hooks were the only change


def test_lowp_changes_nothing_outside_autocast():
    model = debug_model()
    images, noise = inputs(model)
    plain_loss, plain_grads = loss_and_grads(model, images, noise, autocast=False)
    lowp_residual(model)
    loss, grads = loss_and_grads(model, images, noise, autocast=False)
    assert loss == plain_loss
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


@pytest.mark.parametrize(("choice", "hooked"), [("fp32", False), ("lowp", True)])
def test_acceleration_installs_lowp_only_when_asked(choice, hooked):
    model = debug_model()
    images, noise = inputs(model)
    Acceleration(AccelConfig(residual=choice, cache=False), torch.device("cpu"), "bf16").install(model)
    dtypes = block_input_dtypes(model, images, noise, autocast=True)
    assert dtypes == {(torch.bfloat16, torch.bfloat16) if hooked else (torch.float32, torch.float32)}


def test_an_unknown_residual_choice_is_refused():
    with pytest.raises(ValueError, match="accel.residual must be one of fp32, lowp"):
        AccelConfig(residual="bf16")
