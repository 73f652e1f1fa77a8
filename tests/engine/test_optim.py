import pytest
import torch

from openmae.engine.optim import OptimConfig, build_optimizer, set_lr
from openmae.models import create_model


def _decay_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_weight_decay_only_on_matrices_not_biases_norms_or_tokens():
    model = create_model("mae_vit_debug")
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05), lr=1e-3)
    decay = _decay_by_name(model, optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert decay["blocks.0.attn.qkv.weight"] == 0.05
    assert decay["decoder_pred.weight"] == 0.05
    assert decay["patch_embed.proj.weight"] == 0.05
    for name in ["blocks.0.attn.qkv.bias", "norm.weight", "blocks.0.norm1.bias", "cls_token", "mask_token"]:
        assert decay[name] == 0.0, name
    # Frozen position embeddings are not optimised at all.
    assert "pos_embed" not in decay and "decoder_pos_embed" not in decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable


def test_layer_decay_scales_lr_per_block():
    from openmae.models import VisionTransformer

    encoder = VisionTransformer(
        create_model("mae_vit_debug").config.encoder_config(num_classes=10, global_pool="avg")
    )
    optimizer = build_optimizer(encoder, OptimConfig(layer_decay=0.5, weight_decay=0.05), lr=1.0)
    set_lr(optimizer, 1.0)
    names = {id(p): n for n, p in encoder.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    depth = encoder.config.depth  # 2 blocks -> layers: stem 0, blocks 1..2, head 3
    assert lr_of["head.weight"] == pytest.approx(1.0)
    assert lr_of[f"blocks.{depth - 1}.attn.qkv.weight"] == pytest.approx(0.5)
    assert lr_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(0.125)
    assert lr_of["cls_token"] == pytest.approx(0.125)


def test_adamw_is_fused_by_default_and_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    model = create_model("mae_vit_debug")
    initial = [t.clone() for t in model.state_dict().values()]
    fused = build_optimizer(model, OptimConfig(), lr=1e-3)
    assert fused.defaults["fused"] is True
    twin = create_model("mae_vit_debug")
    twin.load_state_dict(model.state_dict())
    loop = build_optimizer(twin, OptimConfig(fused=False), lr=1e-3)
    assert not loop.defaults.get("fused")
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    losses = {}
    for net, optimizer in ((model, fused), (twin, loop)):
        losses[optimizer] = []
        for _ in range(4):
            loss = net(images, noise=noise).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[optimizer].append(loss.detach().item())
    # Weights are not compared one by one: gradients of ~0 (the key bias gets none) become +-lr
    # Adam steps whose sign follows rounding noise, in either kernel.
    torch.testing.assert_close(losses[fused], losses[loop], rtol=1e-5, atol=0)
    assert losses[fused][-1] < losses[fused][0]
    moved = max((a - b).abs().max() for a, b in zip(model.state_dict().values(), initial, strict=True))
    assert moved > 1e-3  # the steps did move the weights
