"""The MAE reference's `.pth` files: `torch.save({'model': state_dict, ...})`, read without running code."""

from __future__ import annotations

import argparse

import pytest
import torch

from openmae.interop import export_timm, load_checkpoint
from openmae.models import MaskedAutoencoder, VisionTransformer

HEADS = {"num_heads": 2, "decoder_num_heads": 2}


def test_full_pretraining_checkpoint(tmp_path, make_mae, same_weights):
    model = make_mae()
    path = tmp_path / "checkpoint-799.pth"
    # A training checkpoint of the reference also holds the optimizer, the epoch and its argparse args.
    torch.save({"model": model.state_dict(), "epoch": 799, "args": argparse.Namespace(lr=1e-3)}, path)

    loaded = load_checkpoint(path, **HEADS)

    assert type(loaded) is MaskedAutoencoder
    assert same_weights(loaded, model)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(imgs, noise=noise).loss, model(imgs, noise=noise).loss)


def test_encoder_only_checkpoint_warns_about_the_decoder(tmp_path, make_mae, same_weights):
    model = make_mae()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": export_timm(model)}, path)

    with pytest.warns(UserWarning, match="no decoder weights.*freshly initialised"):
        loaded = load_checkpoint(path, decoder_embed_dim=16, decoder_depth=1, **HEADS)

    assert type(loaded) is MaskedAutoencoder
    assert same_weights(export_timm(loaded), export_timm(model))
    with torch.no_grad():
        assert torch.equal(
            loaded.forward_features(torch.ones(1, 3, 32, 32)),
            model.forward_features(torch.ones(1, 3, 32, 32)),
        )


def test_encoder_is_loaded_strictly(tmp_path, make_mae):
    state = export_timm(make_mae())
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.ls1.gamma"] = torch.ones(32)  # a timm ViT variant openmae does not have
    with pytest.raises(
        ValueError, match=r"missing \['blocks.1.mlp.fc2.bias'\], unexpected \['blocks.0.ls1.gamma'\]"
    ):
        load_checkpoint({"model": state}, kind="encoder", num_heads=2)
    with pytest.warns(UserWarning, match="encoder weights do not match"):
        load_checkpoint({"model": state}, kind="encoder", num_heads=2, strict=False)


def test_finetuned_avg_pool_checkpoint(tmp_path, make_vit, same_weights):
    model = make_vit(num_classes=7, global_pool="avg")
    state = model.state_dict()
    assert "fc_norm.weight" in state and "norm.weight" not in state  # the reference's layout
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": state}, path)

    loaded = load_checkpoint(path, num_heads=2)

    assert type(loaded) is VisionTransformer
    assert loaded.config.num_classes == 7 and loaded.config.global_pool == "avg"
    assert same_weights(loaded, model)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(imgs), model(imgs))


def test_pretrained_encoder_into_a_new_classifier(tmp_path, make_mae):
    """Fine-tuning starts as in the reference: pretrained `norm` dropped, new `fc_norm` and `head`."""
    state = make_mae().state_dict()
    with pytest.warns(UserWarning) as record:
        model = load_checkpoint(
            {"model": state}, kind="classifier", num_heads=2, num_classes=3, global_pool="avg"
        )
    messages = " ".join(str(w.message) for w in record)
    assert "no head weights" in messages and "no final norm weights" in messages
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_linear_probe_head_is_folded(tmp_path, make_vit):
    """The reference's linear probe puts BatchNorm1d(affine=False, eps=1e-6) before the head."""
    model = make_vit(num_classes=4)
    bn = torch.nn.BatchNorm1d(32, affine=False, eps=1e-6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({f"head.0.{k}": v for k, v in bn.state_dict().items()})
    state.update({"head.1.weight": model.head.weight.detach(), "head.1.bias": model.head.bias.detach()})
    torch.save({"model": state}, tmp_path / "linprobe.pth")

    loaded = load_checkpoint(tmp_path / "linprobe.pth", num_heads=2)

    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.head(bn(model.forward_head(model.forward_features(imgs), pre_logits=True)))
        torch.testing.assert_close(loaded(imgs), expected, rtol=1e-5, atol=1e-5)


def test_ddp_prefixed_keys(make_mae, same_weights):
    model = make_mae()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert same_weights(load_checkpoint({"model": state}, **HEADS), model)


class _Exploit:
    """Unpickling this runs code: it must never be unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path, make_mae):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": make_mae().state_dict(), "payload": _Exploit(str(marker))}, path)

    with pytest.raises(ValueError, match="refused to load .*evil.pth.*exec"):
        load_checkpoint(path, **HEADS)
    assert not marker.exists()
