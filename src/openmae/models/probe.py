"""The MAE linear probe: a frozen ViT, then BatchNorm without affine parameters and a linear layer.

The BatchNorm (the reference code's `head.0`, eps 1e-6) standardises the frozen features so that one
learning rate suits every encoder; in eval mode it folds into the linear layer (`head.1`), which is
how the probe is saved and how the reference's probe checkpoints are read.
"""

from __future__ import annotations

import torch
from torch import nn

from openmae.models.vit import VisionTransformer, ViTConfig

PROBE_BN_EPS = 1e-6


class LinearProbe(VisionTransformer):
    """A frozen ViT with the MAE probe head: BatchNorm without affine (eps 1e-6), then a linear layer.

    The head keeps the reference code's layout (`head.0` BatchNorm, `head.1` linear), whose
    checkpoints `load_checkpoint` folds into one linear head; `to_classifier` does the same fold.
    Only the head trains. `forward` takes images `[B, C, H, W]`, or pooled features `[B, D]`
    extracted beforehand (linear probing without augmentation trains on cached features).
    """

    def __init__(self, config: ViTConfig) -> None:
        if config.num_classes <= 0:
            raise ValueError("a linear probe needs num_classes > 0")
        super().__init__(config)
        linear = nn.Linear(config.embed_dim, config.num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(config.embed_dim, affine=False, eps=PROBE_BN_EPS), linear)
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("head.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` or pooled features `[B, D]` -> logits `[B, num_classes]`."""
        if x.ndim == 2:
            return self.head(x)
        return super().forward(x)

    def to_classifier(self) -> VisionTransformer:
        """A plain `VisionTransformer` giving the same logits in eval mode (BatchNorm folded in)."""
        classifier = VisionTransformer(self.config).to(self.cls_token.device)
        classifier.load_state_dict(fold_probe_head(self.state_dict()))
        return classifier.eval()


def fold_probe_head(state: dict[str, torch.Tensor], eps: float = PROBE_BN_EPS) -> dict[str, torch.Tensor]:
    """Fold a linear-probe head `head.0` (BatchNorm, no affine) + `head.1` into one `head`.

    In eval mode `W (x - mean) / sqrt(var + eps) + b = (W s) x + (b - (W s) mean)`, `s = 1/sqrt(var+eps)`,
    so the folded classifier gives the same logits. Other state dicts are returned unchanged.
    """
    if "head.1.weight" not in state or "head.0.running_mean" not in state:
        return state
    out = dict(state)
    mean, var = out.pop("head.0.running_mean"), out.pop("head.0.running_var")  # [D] each
    out.pop("head.0.num_batches_tracked", None)
    weight, bias = out.pop("head.1.weight"), out.pop("head.1.bias")  # [classes, D], [classes]
    scaled = weight * torch.rsqrt(var + eps)[None, :]  # [classes, D]
    out["head.weight"] = scaled
    out["head.bias"] = bias - scaled @ mean
    return out
