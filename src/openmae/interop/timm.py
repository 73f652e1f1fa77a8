"""timm: openmae's encoder names are timm's, so export is a filter and import needs no table.

`export_timm` gives the encoder weights (no decoder, no mask tokens); a timm `VisionTransformer` of
the same size loads them with `load_state_dict(strict=False)` and only its classifier head missing.
timm state dicts are read by `load_checkpoint` like the MAE reference's.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from openmae.checkpoint.format import unwrap_model
from openmae.models.parts import DECODER, HEAD, part_of
from openmae.models.vit import VisionTransformer


def export_timm(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names (the head too, if the model is a classifier)."""
    model = unwrap_model(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if part_of(k) != DECODER}


def to_timm(model: nn.Module, num_classes: int | None = None) -> TimmVisionTransformer:
    """A timm `VisionTransformer` (eval mode) with the encoder of an openmae model.

    Args:
        model: an openmae VisionTransformer or MaskedAutoencoder.
        num_classes: classes of the timm head; default: the model's own (0 = no head). A head of
            another size is freshly initialised by timm.
    """
    model = unwrap_model(model)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_timm needs an openmae VisionTransformer, got {type(model).__name__}")
    config = model.config
    classes = config.num_classes if num_classes is None else num_classes
    timm_model = TimmVisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=classes,
        global_pool=config.global_pool,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
    )
    state = export_timm(model)
    if classes != config.num_classes:
        state = {k: v for k, v in state.items() if part_of(k) != HEAD}
    result = timm_model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if part_of(k) != HEAD] + list(result.unexpected_keys)
    if leftover:
        raise RuntimeError(f"timm's VisionTransformer does not match the openmae encoder: {leftover[:8]}")
    return timm_model.eval()
