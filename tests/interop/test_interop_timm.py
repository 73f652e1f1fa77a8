"""timm: the exported encoder loads into timm's VisionTransformer and computes the same features."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from openmae.interop import export_timm, load_checkpoint, to_timm
from openmae.models import VisionTransformer


@pytest.mark.parametrize("shape", [{}, {"img_size": (16, 32), "in_chans": 1}])
def test_exported_encoder_loads_into_timm_with_only_the_head_missing(make_mae, shape):
    model = make_mae(**shape)
    config = model.config
    timm_model = TimmViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=10,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
    ).eval()

    result = timm_model.load_state_dict(export_timm(model), strict=False)

    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    imgs = torch.randn(2, config.in_chans, *config.img_size)
    with torch.no_grad():
        torch.testing.assert_close(
            timm_model.forward_features(imgs), model.forward_features(imgs), rtol=1e-5, atol=1e-5
        )


def test_to_timm_classifier_gives_the_same_logits(make_vit):
    model = make_vit(num_classes=5, global_pool="avg")
    timm_model = to_timm(model)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(imgs), model(imgs), rtol=1e-5, atol=1e-5)


def test_timm_state_dict_loads_as_a_classifier(make_vit):
    torch.manual_seed(0)
    timm_model = TimmViT(img_size=32, patch_size=8, num_classes=6, embed_dim=32, depth=2, num_heads=2).eval()

    model = load_checkpoint(timm_model.state_dict(), num_heads=2)

    assert type(model) is VisionTransformer
    assert model.config.num_classes == 6 and model.config.global_pool == "token"
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(imgs), timm_model(imgs), rtol=1e-5, atol=1e-5)
