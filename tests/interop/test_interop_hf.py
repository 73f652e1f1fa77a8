"""HuggingFace ViTMAE: export, import and numerical parity on tiny random models (square images)."""

from __future__ import annotations

import pytest
import torch

from openmae.interop import export_hf, export_timm, load_checkpoint, to_hf
from openmae.interop.hf import HF_TABLES, from_hf_state_dict
from openmae.interop.keymap import to_theirs
from openmae.models import MaskedAutoencoder

HEADS = {"num_heads": 2, "decoder_num_heads": 2}


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_same_loss_and_predictions_as_transformers(make_mae, norm_pix_loss):
    model = make_mae(norm_pix_loss=norm_pix_loss, mask_ratio=0.6)
    hf_model = to_hf(model)
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, model.num_patches)

    with torch.no_grad():
        ours = model(imgs, noise=noise)
        theirs = hf_model(pixel_values=imgs, noise=noise)

    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.ids_restore, theirs.ids_restore)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    torch.testing.assert_close(ours.pred, theirs.logits, rtol=1e-5, atol=1e-5)
    # The encoder alone agrees too (HF's ViTMAEModel output is the normed latent).
    with torch.no_grad():
        latent = model.forward_encoder(imgs, model.choose_masking(3, imgs.device, noise=noise))
        torch.testing.assert_close(
            latent, hf_model.vit(imgs, noise=noise).last_hidden_state, rtol=1e-5, atol=1e-5
        )


def test_config_export(make_mae):
    model = make_mae(in_chans=1, mask_ratio=0.5, norm_pix_loss=True, mlp_ratio=2.0)
    config, _ = export_hf(model)
    assert config.layer_norm_eps == 1e-6
    assert config.hidden_act == "gelu" and config.qkv_bias is True
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.intermediate_size, config.decoder_intermediate_size) == (64, 32)
    assert (
        config.decoder_hidden_size,
        config.decoder_num_hidden_layers,
        config.decoder_num_attention_heads,
    ) == (16, 1, 2)
    assert (config.image_size, config.patch_size, config.num_channels) == (32, 8, 1)
    assert config.mask_ratio == 0.5 and config.norm_pix_loss is True


def test_round_trip_through_state_dict(make_mae, same_weights):
    model = make_mae(in_chans=1, norm_pix_loss=True)
    hf_model = to_hf(model)
    back = load_checkpoint(hf_model.state_dict(), **HEADS)
    assert type(back) is MaskedAutoencoder
    assert same_weights(back, model)


def test_round_trip_through_save_pretrained(tmp_path, make_mae, same_weights):
    model = make_mae(norm_pix_loss=True, mask_ratio=0.6)
    to_hf(model).save_pretrained(tmp_path / "hf")

    back = load_checkpoint(tmp_path / "hf")  # config.json + model.safetensors, heads from the config

    assert same_weights(back, model)
    assert back.config.norm_pix_loss is True and back.config.mask_ratio == 0.6
    assert back.config.num_heads == 2 and back.config.decoder_num_heads == 2


@pytest.mark.parametrize("layout", ["legacy", "v5"])
def test_both_hf_layouts_are_read(layout, make_mae, same_weights):
    model = make_mae()
    _, state = export_hf(model, layout=layout)
    expected_qkv = (
        "vit.encoder.layer.0.attention.attention.query.weight"
        if layout == "legacy"
        else "vit.layers.0.attention.q_proj.weight"
    )
    assert expected_qkv in state
    # HF's query / key / value are the thirds of openmae's fused qkv, in that order.
    key_name = expected_qkv.replace("query", "key").replace("q_proj", "k_proj")
    assert torch.equal(state[key_name], model.blocks[0].attn.qkv.weight[32:64])
    assert same_weights(from_hf_state_dict(state), model.state_dict())


def test_hub_style_pytorch_model_bin_folder(tmp_path, make_mae, same_weights):
    """A transformers-4 Hub folder: config.json + pytorch_model.bin in the legacy layout."""
    model = make_mae()
    config, _ = export_hf(model)
    folder = tmp_path / "hub"
    config.save_pretrained(folder)
    state = to_theirs(model.state_dict(), HF_TABLES["legacy"], "HF")
    torch.save(state, folder / "pytorch_model.bin")
    assert same_weights(load_checkpoint(folder), model)


def test_vitmae_model_encoder_only(make_mae, same_weights):
    model = make_mae()
    encoder = to_hf(model).vit  # a ViTMAEModel: no `vit.` prefix, no decoder
    with pytest.warns(UserWarning, match="no decoder weights"):
        back = load_checkpoint(encoder.state_dict(), decoder_embed_dim=16, decoder_depth=1, **HEADS)
    assert same_weights(export_timm(back), export_timm(model))


def test_export_refuses_what_hf_cannot_hold(make_mae, make_vit):
    with pytest.raises(ValueError, match="square"):
        export_hf(make_mae(img_size=(32, 16)))
    with pytest.raises(TypeError, match="MaskedAutoencoder"):
        export_hf(make_vit())
