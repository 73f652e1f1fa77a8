"""Architecture from tensor shapes alone, and position tables resized on load."""

from __future__ import annotations

import pytest
import torch

from openmae.checkpoint import save_checkpoint
from openmae.interop import infer_config, load_checkpoint
from openmae.interop.infer import guess_heads
from openmae.models import (
    MAEConfig,
    MaskedAutoencoder,
    MaskTokensInEncoder,
    VisionTransformer,
    ViTConfig,
    build_mae,
    resize_pos_embed,
    sincos_2d,
)


def mae_config(**changes) -> MAEConfig:
    base = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    decoder = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
    return MAEConfig(**{**base, **decoder, **changes})


@pytest.mark.parametrize(
    "config",
    [
        mae_config(),
        mae_config(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0,
                   decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3),
        mae_config(img_size=(16, 48), in_chans=4, depth=1, num_heads=4,
                   decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=4, encoder_mask_tokens=True),
    ],
)  # fmt: skip
def test_mae_architecture_without_a_model(config):
    state = build_mae(config).state_dict()
    heads = {"num_heads": config.num_heads, "decoder_num_heads": config.decoder_num_heads}
    square = config.img_size[0] == config.img_size[1]

    model = load_checkpoint(state, img_size=None if square else config.img_size, **heads)

    assert type(model) is (MaskTokensInEncoder if config.encoder_mask_tokens else MaskedAutoencoder)
    assert model.config == config


def test_inferred_fields_of_a_classifier():
    config = ViTConfig(
        img_size=24, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=3, global_pool="avg"
    )
    state = VisionTransformer(config).state_dict()
    fields = infer_config(state, given={"num_heads"})
    assert fields == {
        "img_size": (24, 24), "patch_size": 4, "in_chans": 3, "embed_dim": 64, "depth": 2,
        "mlp_ratio": 4.0, "num_classes": 3, "global_pool": "avg",
    }  # fmt: skip


def test_heads_table_and_guess():
    assert [guess_heads(w, {192: 3, 768: 12}, 64) for w in (192, 768, 256, 32)] == [3, 12, 4, 1]
    config = mae_config(
        img_size=16, embed_dim=256, depth=1, num_heads=4, decoder_embed_dim=512, decoder_num_heads=16
    )
    state = MaskedAutoencoder(config).state_dict()
    with pytest.warns(UserWarning, match="guessed 4 for the non-standard width 256.*num_heads="):
        fields = infer_config(state)
    # 512 is the standard decoder width: its 16 heads come from the table, without a warning.
    assert fields["num_heads"] == 4 and fields["decoder_num_heads"] == 16


def test_non_square_grid_needs_the_image_size():
    state = MaskedAutoencoder(mae_config(img_size=(16, 32))).state_dict()
    with pytest.raises(ValueError, match="grid of a pos_embed with 8 patches"):
        load_checkpoint(state, num_heads=2, decoder_num_heads=2)


def test_sincos_positions_are_recomputed_for_a_new_rectangular_size(tmp_path, make_mae):
    model = make_mae(keep_positions=True)
    path = save_checkpoint(model, tmp_path / "w.safetensors")

    bigger = load_checkpoint(path, img_size=(48, 64))

    assert bigger.grid_size == (6, 8)
    torch.testing.assert_close(bigger.pos_embed[0], sincos_2d(32, (6, 8)))
    torch.testing.assert_close(bigger.decoder_pos_embed[0], sincos_2d(16, (6, 8)))
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        out = bigger(torch.randn(2, 3, 48, 64), noise=torch.rand(2, 48))
    assert out.pred.shape == (2, 48, 8 * 8 * 3) and torch.isfinite(out.loss)


def test_learned_positions_are_resampled(make_vit):
    """A fine-tuned (no longer sin-cos) table is interpolated like timm does, from a reference .pth."""
    model = make_vit(num_classes=2)  # perturbed pos_embed: not sin-cos any more
    state = {"model": model.state_dict()}

    resized = load_checkpoint(state, img_size=(16, 48), num_heads=2)

    expected = resize_pos_embed(model.pos_embed.detach(), (4, 4), (2, 6))
    torch.testing.assert_close(resized.pos_embed.detach(), expected)
    assert not torch.allclose(resized.pos_embed[0], sincos_2d(32, (2, 6)), atol=1e-3)
