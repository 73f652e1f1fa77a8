"""Named sizes: the list, their configs, building them, and errors for unknown names and options."""

from __future__ import annotations

import pytest
import torch

from openmae.interop import export_timm
from openmae.models import MAEConfig, MaskedAutoencoder, create_model, list_models, model_config

# name -> (patch, width, depth, heads, encoder parameters) of the paper's sizes; the counts are
# those of timm's ViT-B/16, L/16 and H/14 without a head (position embedding included).
PAPER_SIZES = {
    "mae_vit_tiny_patch16": (16, 192, 12, 3, None),
    "mae_vit_small_patch16": (16, 384, 12, 6, None),
    "mae_vit_base_patch16": (16, 768, 12, 12, 85_798_656),
    "mae_vit_large_patch16": (16, 1024, 24, 16, 303_301_632),
    "mae_vit_huge_patch14": (14, 1280, 32, 16, 630_764_800),
}
SMALL = ["mae_vit_debug", "mae_vit_mini_patch4_28"]


def test_list_models_has_the_paper_sizes_and_the_debug_model() -> None:
    names = list_models()
    assert set(PAPER_SIZES) | {"mae_vit_debug"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_models())
def test_every_named_config_is_valid_and_round_trips(name: str) -> None:
    config = model_config(name)
    assert isinstance(config, MAEConfig)
    assert MAEConfig(**config.to_dict()) == config
    h, w = config.grid_size
    assert h * config.patch_size == config.img_size[0] and w * config.patch_size == config.img_size[1]


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_sizes(name: str) -> None:
    patch, width, depth, heads, encoder_params = PAPER_SIZES[name]
    config = model_config(name)
    shape = (config.patch_size, config.embed_dim, config.depth, config.num_heads)
    assert shape == (patch, width, depth, heads)
    assert config.img_size == (224, 224) and config.in_chans == 3 and config.mlp_ratio == 4.0
    # The paper's decoder and pretext task.
    assert (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads) == (512, 8, 16)
    assert config.mask_ratio == 0.75 and config.mask_sampling == "random"
    if encoder_params is not None:
        with torch.device("meta"):  # shapes only, no memory
            model = MaskedAutoencoder(config)
        assert sum(t.numel() for t in export_timm(model).values()) == encoder_params


@pytest.mark.parametrize("name", SMALL)
def test_small_models_build_and_run(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    C, (H, W) = model.config.in_chans, model.config.img_size
    out = model(torch.randn(2, C, H, W))
    assert torch.isfinite(out.loss)
    assert out.pred.shape == (2, model.num_patches, model.patch_size**2 * C)


def test_overrides_reach_the_model_and_leave_the_registry_alone() -> None:
    model = create_model("mae_vit_debug", norm_pix_loss=False, mask_ratio=0.5, in_chans=1)
    assert not model.config.norm_pix_loss and model.config.mask_ratio == 0.5
    assert model.patch_embed.proj.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).mask.sum().item() == 2 * 8
    fresh = model_config("mae_vit_debug")
    assert fresh.norm_pix_loss and fresh.mask_ratio == 0.75 and fresh.in_chans == 3
    assert model_config("mae_vit_debug") is not model_config("mae_vit_debug")


def test_unknown_option_raises_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="did you mean 'mask_ratio'"):
        create_model("mae_vit_debug", mask_ration=0.5)
    with pytest.raises(ValueError, match="unknown model option 'zzz'"):
        model_config("mae_vit_debug", zzz=1)


def test_unknown_model_raises_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="did you mean 'mae_vit_debug'"):
        create_model("mae_vit_debg")


def test_invalid_overrides_raise() -> None:
    with pytest.raises(ValueError):
        model_config("mae_vit_debug", img_size=30)  # not divisible by the patch size
    with pytest.raises(ValueError):
        model_config("mae_vit_debug", mask_ratio=1.0)
    with pytest.raises(ValueError):
        model_config("mae_vit_debug", mask_sampling="checkerboard")
    with pytest.raises(ValueError):
        model_config("mae_vit_debug", decoder_embed_dim=18)
