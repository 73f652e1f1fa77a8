"""What a training step computes: the loss of a batch, for pretraining and for classification.

A task is a callable `(model, (images, labels, seeds), device) -> loss`. Every random draw it makes
comes from the batch's per-sample seeds (see `engine.sampler`), so a resumed run replays them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from timm.data import Mixup
from torch import nn

from openmae.models.masking import block_mask

_MASK_STREAM = 0x5EED  # offsets a sample's seed so its masking is independent of its augmentation


class PretrainTask:
    """The MAE loss of a batch, its masks drawn from each sample's seed.

    Random masking draws uniform noise per sample, block masking draws its blocks per sample, grid
    masking is fixed: with the same seeds the masks are the same, whatever the batch composition,
    the rank or a resume in between.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        mask_ratio: float,
        sampling: str = "random",
        predict: str = "hidden",
    ) -> None:
        self.grid_size = tuple(grid_size)
        self.mask_ratio = mask_ratio
        self.sampling = sampling
        self.predict = predict  # "hidden": the decoder's tail runs at the patches the loss reads

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        images, _, seeds = batch
        images = images.to(device, non_blocking=True)
        return model(images, **self.masking(seeds, device), predict=self.predict).loss

    def masking(self, seeds: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """`{"noise": [B, L]}` (random), `{"mask": [B, L]}` (block) or `{}` (grid: the model's own)."""
        if self.sampling == "random":
            return {"noise": noise_from_seeds(seeds, self.grid_size[0] * self.grid_size[1], device)}
        if self.sampling == "block":
            masks = [
                block_mask(self.grid_size, self.mask_ratio, random.Random(int(s) ^ _MASK_STREAM))
                for s in seeds.tolist()
            ]
            return {"mask": torch.stack(masks).to(device, non_blocking=True)}  # [B, L]
        return {}


def noise_from_seeds(seeds: torch.Tensor, num_patches: int, device: torch.device | str) -> torch.Tensor:
    """Per-sample masking noise `[B, L]`, uniform in [0, 1), drawn from each sample's seed.

    Independent of the augmentation stream (the seed is offset), of batch composition and of rank.
    """
    rows = [
        torch.rand(num_patches, generator=torch.Generator().manual_seed(int(s) ^ _MASK_STREAM))
        for s in seeds.tolist()
    ]
    return torch.stack(rows).to(device, non_blocking=True)  # [B, L]


class ClassifyTask:
    """The batch loss of a classifier: optional mixup / cutmix, then the criterion.

    Mixup draws from NumPy's and Python's global RNGs; they are seeded from the batch's first
    sample seed (and restored after), so a resumed run mixes its batches exactly as before.
    """

    def __init__(self, criterion: nn.Module, mixup: Mixup | None = None) -> None:
        self.criterion = criterion
        self.mixup = mixup

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        inputs, labels, seeds = batch
        inputs, targets = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if self.mixup is not None:
            if len(inputs) % 2:  # timm mixes a batch with its reverse: it needs an even size
                inputs, targets, seeds = inputs[:-1], targets[:-1], seeds[:-1]
            with numpy_and_python_seeded(int(seeds[0])):
                inputs, targets = self.mixup(inputs, targets)  # targets: [B, classes], rows sum to 1
        return self.criterion(model(inputs), targets)


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
