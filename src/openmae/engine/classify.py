"""Classification on top of an encoder: mixup and losses, LARS, and freezing all but the last blocks.

Linear probing and fine-tuning share these, the training loop and `engine.tasks.ClassifyTask`; they
differ in which parameters train, the head, the optimizer and the augmentation (see the recipes).
"""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars
from torch import nn

from openmae.models.vit import VisionTransformer


def build_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Mixup | None:
    """timm's batch Mixup / CutMix (switching between them at random when both are on), or None."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def build_criterion(mixup: Mixup | None, smoothing: float) -> nn.Module:
    """Soft-target cross-entropy with mixup (its targets carry the smoothing), else (smoothed) CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------------------------
# Linear probing (the probe model is `openmae.models.probe.LinearProbe`)


# A LARS step moves a matrix by lr x this share of its norm (timm's default, the paper's recipe).
LARS_TRUST_COEFF = 1e-3


def build_lars(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    matrix_lr_scale: float = 1.0,
) -> Lars:
    """LARS as the MAE linear probe uses it: trust ratio on weight matrices, none on biases and norms.

    timm's `Lars` adapts a group only when its weight decay is non-zero (`always_adapt=False`), so
    with the probe's weight decay 0 it would be plain SGD: matrices get `always_adapt=True`, and
    one-dimensional parameters go in a group that is neither adapted nor decayed. The matrices' lr
    is `lr` x `matrix_lr_scale` (an `lr_scale`, which the training loop's `set_lr` honours): their
    trust-ratio steps are a share of their norm, the biases' plain steps are not (see
    `recipes.linprobe.lars_matrix_scale`).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in trainable if p.ndim > 1],
            "weight_decay": weight_decay,
            "always_adapt": True,
            "lr_scale": matrix_lr_scale,
        },
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=LARS_TRUST_COEFF)


# ------------------------------------------------------------------------------------------------
# Fine-tuning


def train_only_last_blocks(model: VisionTransformer, num_blocks: int) -> list[str]:
    """Partial fine-tuning (the paper's Figure 9): freeze all but the last `num_blocks` blocks,
    the final norms and the head. Returns the names of the parameters left trainable."""
    depth = len(model.blocks)
    if not 0 <= num_blocks <= depth:
        raise ValueError(f"trainable_blocks must be between 0 and the depth {depth}, got {num_blocks}")
    trained = tuple(f"blocks.{i}." for i in range(depth - num_blocks, depth)) + ("norm.", "fc_norm.", "head.")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trained)
        if param.requires_grad:
            names.append(name)
    return names
