"""openmae's own checkpoint format: safetensors with the config in the metadata."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from openmae.checkpoint import read_metadata, save_checkpoint
from openmae.interop import export_timm, load_checkpoint
from openmae.models import MaskedAutoencoder, VisionTransformer


def test_round_trip_rectangular_grayscale(tmp_path, make_mae, same_weights):
    model = make_mae(img_size=(16, 32), in_chans=1, norm_pix_loss=True, mask_ratio=0.6)
    path = save_checkpoint(model, tmp_path / "run" / "weights.safetensors", metadata={"step": "7"})

    loaded = load_checkpoint(path)

    assert type(loaded) is MaskedAutoencoder
    assert loaded.config == model.config
    assert loaded.grid_size == (2, 4)
    assert same_weights(loaded, model)
    imgs = torch.randn(2, 1, 16, 32)
    noise = torch.rand(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(imgs, noise=noise).pred, model(imgs, noise=noise).pred)


def test_metadata(tmp_path, make_mae):
    model = make_mae()
    path = save_checkpoint(model, tmp_path / "w.safetensors", metadata={"step": "100", "target": "pixels"})
    meta = read_metadata(path)
    assert meta["format"] == "openmae" and meta["version"] == "1"
    assert meta["model_class"] == "MaskedAutoencoder"
    assert json.loads(meta["config"]) == model.config.to_dict()
    assert meta["step"] == "100" and meta["target"] == "pixels"


def test_classifier_round_trip(tmp_path, make_vit, same_weights):
    model = make_vit(num_classes=5, global_pool="avg")
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "cls.safetensors"))
    assert type(loaded) is VisionTransformer
    assert loaded.config == model.config
    assert same_weights(loaded, model)


def test_load_into_given_model(tmp_path, make_mae, same_weights):
    model = make_mae(seed=1)
    path = save_checkpoint(model, tmp_path / "w.safetensors")
    target = make_mae(seed=2)
    assert not same_weights(target, model)
    assert load_checkpoint(path, model=target) is target
    assert same_weights(target, model)


def test_wrapped_model_is_saved_under_plain_names(tmp_path, make_mae, same_weights):
    model = make_mae()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like
    loaded = load_checkpoint(save_checkpoint(wrapped, tmp_path / "w.safetensors"))
    assert same_weights(loaded, model)


def test_refuses_non_finite_weights(tmp_path, make_mae):
    model = make_mae()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="non-finite.*blocks.0.attn.qkv.weight"):
        save_checkpoint(model, path)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_overwrite_is_atomic_and_complete(tmp_path, make_mae, same_weights):
    path = tmp_path / "w.safetensors"
    save_checkpoint(make_mae(seed=1), path)
    newer = make_mae(seed=2)
    save_checkpoint(newer, path)
    assert same_weights(load_checkpoint(path), newer)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_metadata_errors(tmp_path, make_mae):
    model = make_mae()
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "a.safetensors", metadata={"config": "{}"})
    with pytest.raises(ValueError, match="strings"):
        save_checkpoint(model, tmp_path / "b.safetensors", metadata={"step": 3})


def test_bad_inputs_give_clear_errors(tmp_path, make_mae):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth")

    path = save_checkpoint(make_mae(embed_dim=32), tmp_path / "w.safetensors")
    with pytest.raises(
        ValueError, match=r"shape mismatch in .*cls_token: checkpoint \[1, 1, 32\] vs model \[1, 1, 64\]"
    ):
        load_checkpoint(path, model=make_mae(embed_dim=64))
    with pytest.raises(ValueError, match="unknown MAEConfig fields"):
        load_checkpoint(path, num_head=2)


def test_encoder_of_a_pretrained_mae(tmp_path, make_mae, same_weights):
    model = make_mae()
    path = save_checkpoint(model, tmp_path / "w.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropping the decoder on request is not worth a warning
        encoder = load_checkpoint(path, kind="encoder")
    assert type(encoder) is VisionTransformer and encoder.config.num_classes == 0
    assert same_weights(encoder, export_timm(model))
    with pytest.raises(ValueError, match="num_classes="):
        load_checkpoint(path, kind="classifier")
