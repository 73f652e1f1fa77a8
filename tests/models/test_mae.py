"""The masked autoencoder: what the encoder sees, the loss, gradients, initialisation and names."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from openmae.interop import export_timm
from openmae.models import MaskedAutoencoder, create_model, random_masking, sincos_2d
from openmae.models.layers import take_tokens
from openmae.models.patches import patchify, unpatchify


def make_model(seed: int = 0, **overrides) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return create_model("mae_vit_debug", **overrides).eval()


def images(B: int = 2, C: int = 3, H: int = 32, W: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def noise(B: int = 2, L: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, L, generator=torch.Generator().manual_seed(seed))


def change_patches(imgs: torch.Tensor, which: torch.Tensor, patch_size: int = 8) -> torch.Tensor:
    """Add noise to the pixels of the patches where `which` (`[B, L]`) is 1."""
    patches = patchify(imgs, patch_size)  # [B, L, P*P*C]
    patches = patches + which[..., None] * torch.randn_like(patches)
    grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
    return unpatchify(patches, patch_size, grid)


def hand_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the pixels of each patch, then mean over the hidden patches only."""
    B, L, N = pred.shape
    per_patch = []
    for b in range(B):
        for n in range(L):
            if mask[b, n] == 1:
                diffs = (pred[b, n] - target[b, n]).tolist()
                per_patch.append(sum(d * d for d in diffs) / N)
    return sum(per_patch) / len(per_patch)


# ---------------------------------------------------------------------------------------------
# Properties of the method


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
def test_encoder_ignores_hidden_pixels_and_sees_visible_ones(encoder_mask_tokens: bool) -> None:
    model = make_model(encoder_mask_tokens=encoder_mask_tokens)
    imgs = images()
    masking = random_masking(noise(), 0.75)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, masking)
        hidden_changed = model.forward_encoder(change_patches(imgs, masking.mask), masking)
        visible = torch.zeros_like(masking.mask).scatter(1, masking.ids_keep[:, :1], 1.0)
        visible_changed = model.forward_encoder(change_patches(imgs, visible), masking)
    tokens = 16 if encoder_mask_tokens else 4
    assert latent.shape == (2, 1 + tokens, 32)
    torch.testing.assert_close(hidden_changed, latent, rtol=0, atol=1e-6)
    assert (visible_changed - latent).abs().amax(dim=(1, 2)).min() > 1e-3  # every sample changed


def test_visible_predictions_do_not_change_the_loss() -> None:
    B, L, N = 2, 16, 192
    pred, target = torch.randn(B, L, N), torch.randn(B, L, N)
    mask = random_masking(noise(B, L), 0.75).mask
    loss = MaskedAutoencoder.forward_loss(pred, target, mask)
    pred_visible = pred + (1 - mask)[..., None] * 100 * torch.randn(B, L, N)
    assert torch.equal(MaskedAutoencoder.forward_loss(pred_visible, target, mask), loss)
    pred_hidden = pred + mask[..., None] * torch.randn(B, L, N)
    assert not torch.allclose(MaskedAutoencoder.forward_loss(pred_hidden, target, mask), loss)
    assert loss.item() == pytest.approx(hand_loss(pred, target, mask), rel=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_masked_mse_against_the_target(norm_pix_loss: bool) -> None:
    model = make_model(norm_pix_loss=norm_pix_loss)
    imgs = images()
    with torch.no_grad():
        out = model(imgs, noise=noise())
    target = patchify(imgs, 8)  # [B, L, 192]
    if norm_pix_loss:
        target = hand_norm_pix(target)
    torch.testing.assert_close(model.reconstruction_target(imgs), target, rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(hand_loss(out.pred, target, out.mask), rel=1e-5)
    assert torch.equal(out.mask, random_masking(noise(), 0.75).mask)


def hand_norm_pix(patches: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-6) per patch, var unbiased, with python arithmetic."""
    out = torch.empty_like(patches)
    for b in range(patches.shape[0]):
        for n in range(patches.shape[1]):
            values = patches[b, n].tolist()
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            out[b, n] = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in values])
    return out


def test_decoder_positions_tell_hidden_patches_apart() -> None:
    # Every hidden patch enters the decoder as the same mask token and attention is permutation
    # equivariant, so only the decoder's position embedding can make their predictions differ.
    model, imgs = make_model(), images()
    masking = random_masking(noise(), 0.75)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, masking)
        pred = model.forward_decoder(latent, masking)  # [B, L, P*P*C]
        model.decoder_pos_embed.zero_()
        pred_without_positions = model.forward_decoder(latent, masking)
    hidden = masking.mask[0].bool()
    assert pred[0, hidden].std(dim=0).min() > 1e-4
    torch.testing.assert_close(
        pred_without_positions[0, hidden].std(dim=0), torch.zeros(192), atol=1e-5, rtol=0
    )


def test_mask_ratio_zero_gives_zero_loss_not_nan() -> None:
    model = make_model()
    out = model(images(), mask_ratio=0.0)
    assert torch.equal(out.mask, torch.zeros(2, 16))
    assert out.loss.item() == 0.0
    assert out.pred.shape == (2, 16, 192)


def test_forward_is_reproducible_with_noise_or_generator() -> None:
    model, imgs = make_model(), images()
    with torch.no_grad():
        a, b = model(imgs, noise=noise()), model(imgs, noise=noise())
        gen = lambda: torch.Generator().manual_seed(3)
        c, d = model(imgs, generator=gen()), model(imgs, generator=gen())
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    assert torch.equal(c.mask, d.mask) and torch.equal(c.loss, d.loss)
    with pytest.raises(ValueError, match="noise"):
        model(imgs, noise=noise(2, 15))


# ---------------------------------------------------------------------------------------------
# Gradients


def test_every_trainable_parameter_gets_a_gradient_and_positions_none() -> None:
    model = make_model().train()
    model(images(4), noise=noise(4)).loss.backward()
    for name, p in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}


def test_mask_tokens_in_the_encoder() -> None:
    model = make_model(encoder_mask_tokens=True).train()
    assert not hasattr(model, "mask_token")
    out = model(images(), noise=noise())
    assert torch.isfinite(out.loss) and out.pred.shape == (2, 16, 192)
    out.loss.backward()
    grad = model.encoder_mask_token.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Predicting the hidden patches only (what training asks for)


def loss_and_gradients(model: MaskedAutoencoder, predict: str, **kwargs) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(images(4), noise=noise(4), predict=predict, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicting_the_hidden_patches_only_gives_the_same_loss_and_gradients(
    encoder_mask_tokens: bool, checkpointing: bool
) -> None:
    model = make_model(encoder_mask_tokens=encoder_mask_tokens).train()
    model.set_grad_checkpointing(checkpointing)
    every, every_grads = loss_and_gradients(model, "all")
    hidden, hidden_grads = loss_and_gradients(model, "hidden")
    ids_hidden = random_masking(noise(4), 0.75).ids_hidden  # [B, L-K]

    assert hidden.pred.shape == (4, 12, 192) and torch.equal(hidden.ids_hidden, ids_hidden)
    assert torch.equal(hidden.mask.gather(1, ids_hidden), torch.ones(4, 12))
    torch.testing.assert_close(hidden.pred, take_tokens(every.pred, ids_hidden))
    torch.testing.assert_close(hidden.loss, every.loss)
    assert hidden_grads.keys() == every_grads.keys()
    for name, grad in every_grads.items():
        torch.testing.assert_close(hidden_grads[name], grad, msg=name)


def test_predicting_the_hidden_patches_of_nothing_hidden_gives_zero_loss() -> None:
    out = make_model()(images(), mask_ratio=0.0, predict="hidden")
    assert out.pred.shape == (2, 0, 192) and out.loss.item() == 0.0


def test_an_unknown_prediction_choice_and_a_decoder_without_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="predict must be 'all' or 'hidden'"):
        make_model()(images(), predict="visible")
    with pytest.raises(ValueError, match="decoder_depth must be at least 1"):
        make_model(decoder_depth=0)


# ---------------------------------------------------------------------------------------------
# Initialisation


def test_initialisation_follows_the_reference() -> None:
    # Wide enough for the token std to be measured well (512 draws: std error ~3%).
    model = make_model(embed_dim=512, num_heads=2, depth=1, decoder_embed_dim=512)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            assert module.eps == 1e-6, name
        if isinstance(module, nn.Linear | nn.Conv2d):
            # The reference zeroes linear biases; the patch projection's bias keeps torch's default.
            if isinstance(module, nn.Linear):
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            # xavier-uniform over (fan_out, fan_in), the patch projection seen as a linear layer
            weight = module.weight.flatten(1)
            bound = math.sqrt(6 / sum(weight.shape))
            assert weight.abs().max() <= bound, name
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    for token in (model.cls_token, model.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.15)
        assert token.mean().abs().item() < 0.005
    assert torch.equal(model.pos_embed[0], sincos_2d(512, (4, 4)))
    assert torch.equal(model.decoder_pos_embed[0], sincos_2d(512, (4, 4)))


def test_decoder_position_embedding_has_decoder_width() -> None:
    model = make_model()
    assert model.decoder_pos_embed.shape == (1, 17, 16)
    assert torch.equal(model.decoder_pos_embed[0], sincos_2d(16, (4, 4)))
    assert torch.equal(model.pos_embed[0], sincos_2d(32, (4, 4)))


# ---------------------------------------------------------------------------------------------
# Names and interfaces


def test_encoder_names_and_shapes_are_timms() -> None:
    model = make_model()
    timm_vit = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in export_timm(model).items()}
    theirs = {k: tuple(v.shape) for k, v in timm_vit.state_dict().items()}
    assert ours == theirs
    for key in model.state_dict():
        assert key in ours or key.startswith("decoder_") or key == "mask_token", key
    # Same names, same computation: timm with our encoder weights gives our features.
    timm_vit.load_state_dict(export_timm(model))
    imgs = images()
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.eval().forward_features(imgs), model.forward_features(imgs))


def test_forward_features_is_deterministic_and_shaped() -> None:
    model, imgs = make_model(), images(3)
    with torch.no_grad():
        first, second = model.forward_features(imgs), model.forward_features(imgs)
    assert first.shape == (3, 1 + 16, 32)
    assert torch.equal(first, second)


def test_rectangular_images() -> None:
    model = make_model(img_size=(32, 48))
    assert model.grid_size == (4, 6) and model.num_patches == 24
    assert torch.equal(model.pos_embed[0], sincos_2d(32, (4, 6)))
    imgs = images(2, H=32, W=48)
    with torch.no_grad():
        out = model(imgs, noise=noise(2, 24))
        features = model.forward_features(imgs)
    assert out.pred.shape == (2, 24, 192) and out.mask.sum().item() == 2 * 18
    assert torch.isfinite(out.loss)
    assert features.shape == (2, 25, 32)
    # The prediction un-patchifies onto the 4 x 6 grid.
    assert unpatchify(out.pred, 8, model.grid_size).shape == (2, 3, 32, 48)


def test_four_channel_images() -> None:
    model = make_model(in_chans=4)
    out = model(images(2, C=4), noise=noise())
    assert out.pred.shape == (2, 16, 8 * 8 * 4)
    assert torch.isfinite(out.loss)
    assert model.forward_features(images(2, C=4)).shape == (2, 17, 32)


@pytest.mark.parametrize(("C", "H", "W"), [(3, 32, 32), (4, 32, 48), (1, 48, 32)])
def test_embedding_only_the_kept_patches_gives_the_full_embeddings_tokens(C: int, H: int, W: int) -> None:
    """The encoder embeds the visible patches alone: the same tokens as embedding every patch
    (timm's convolution) and keeping the visible ones, for any channel count and grid."""
    model = make_model(in_chans=C, img_size=(H, W))
    imgs = images(2, C=C, H=H, W=W)
    ids = torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :5]
    with torch.no_grad():
        every = model.embed_patches(imgs)  # [B, L, D]
        kept = model.embed_patches_at(imgs, ids)  # [B, 5, D]
    assert kept.shape == (2, 5, 32)
    expected = torch.gather(every, 1, ids[..., None].expand(-1, -1, every.shape[-1]))
    torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-5)


def test_images_of_another_size_are_refused_in_one_line() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="images are 40x40; this model takes 32x32"):
        model(images(2, H=40, W=40), noise=noise())
