"""Classification on top of an encoder: the task, the linear-probe model, LARS and freezing.

Linear probing and fine-tuning share all of this and the training loop; they differ in which
parameters train, the head, the optimizer and the augmentation (see `openmae.recipes.classify`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars
from torch import nn

from openmae.interop.reference import LINPROBE_BN_EPS, fold_linprobe_head
from openmae.models.vit import VisionTransformer, ViTConfig


class ClassifyTask:
    """The batch loss of a classifier: optional mixup / cutmix, then the criterion.

    Mixup draws from NumPy's and Python's global RNGs; they are seeded from the batch's first
    sample seed (and restored after), so a resumed run mixes its batches exactly as before.
    """

    def __init__(self, criterion: nn.Module, mixup: Mixup | None = None) -> None:
        self.criterion = criterion
        self.mixup = mixup

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> tuple[torch.Tensor, dict]:
        inputs, labels, seeds = batch
        inputs, targets = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if self.mixup is not None:
            if len(inputs) % 2:  # timm mixes a batch with its reverse: it needs an even size
                inputs, targets, seeds = inputs[:-1], targets[:-1], seeds[:-1]
            with numpy_and_python_seeded(int(seeds[0])):
                inputs, targets = self.mixup(inputs, targets)  # targets: [B, classes], rows sum to 1
        return self.criterion(model(inputs), targets), {}


@contextlib.contextmanager
def numpy_and_python_seeded(seed: int) -> Iterator[None]:
    """Seed NumPy's and Python's global RNGs for a block, then put their states back."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


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
# Linear probing


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
        self.head = nn.Sequential(nn.BatchNorm1d(config.embed_dim, affine=False, eps=LINPROBE_BN_EPS), linear)
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
        classifier.load_state_dict(fold_linprobe_head(self.state_dict()))
        return classifier.eval()


def build_lars(model: nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> Lars:
    """LARS as the MAE linear probe uses it: trust ratio on weight matrices, none on biases and norms.

    timm's `Lars` adapts a group only when its weight decay is non-zero (`always_adapt=False`), so
    with the probe's weight decay 0 it would be plain SGD: matrices get `always_adapt=True`, and
    one-dimensional parameters go in a group that is neither adapted nor decayed.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay, "always_adapt": True},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum)


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
