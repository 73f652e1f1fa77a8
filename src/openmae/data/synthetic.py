"""Synthetic images with structure (oriented stripes under smooth blobs) for tests and benchmarks.

Every image is a pure function of (seed, index), so no file, download or shared state is needed and
any worker or rank renders the same pixels. The stripe orientation encodes the label, so a probe
trained on features of these images has something to find.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.layers import to_2tuple
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """`size` images `[in_chans, H, W]` in [0, 1] (then transformed) with labels `index % num_classes`.

    Args:
        size: number of images.
        img_size: side, or (H, W).
        in_chans: channel count (any).
        num_classes: labels cycle through 0..num_classes-1; each has its own stripe orientation.
        seed: selects a different set of images.
        transform: applied to the float image.
    """

    def __init__(
        self,
        size: int = 1024,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if size < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(
                f"size, in_chans and num_classes must be positive, got {size}, {in_chans}, {num_classes}"
            )
        self.size = size
        self.img_size = tuple(to_2tuple(img_size))
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.classes = [f"stripes_{i}" for i in range(num_classes)]

    @property
    def targets(self) -> list[int]:
        return [i % self.num_classes for i in range(self.size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic images")
        label = index % self.num_classes
        # Hashing a tuple of ints is stable across runs (no hash randomisation for ints).
        generator = torch.Generator().manual_seed(hash((self.seed, index)) & (2**63 - 1))
        image = render_image(self.img_size, self.in_chans, label, self.num_classes, generator)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def render_image(
    img_size: tuple[int, int], in_chans: int, label: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """One image `[C, H, W]` in [0, 1]: a background colour, stripes at angle `pi * label / num_classes`
    (jittered by under a third of the gap between classes), and three Gaussian blobs of random colour."""
    H, W = img_size
    C = in_chans
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    y = torch.linspace(0, 1, H)[:, None]  # [H, 1]
    x = torch.linspace(0, 1, W)[None, :]  # [1, W]

    step = math.pi / num_classes
    angle = step * (label + 0.6 * (rand(()) - 0.5))
    frequency = 2 + 4 * rand(())  # cycles across the image
    phase = 2 * math.pi * rand(())
    along = x * torch.cos(angle) + y * torch.sin(angle)  # [H, W], distance along the stripes' normal
    stripes = torch.sin(2 * math.pi * frequency * along + phase)  # [H, W]

    centres, sigmas = rand(3, 2), 0.08 + 0.22 * rand(3)
    cy, cx = centres[:, 0, None, None], centres[:, 1, None, None]  # [3, 1, 1]
    dist2 = (y[None] - cy) ** 2 + (x[None] - cx) ** 2  # [3, H, W]
    blobs = torch.exp(-dist2 / (2 * sigmas[:, None, None] ** 2))  # [3, H, W]

    background = 0.2 + 0.6 * rand(C)  # [C]
    stripe_colour = 0.4 * (rand(C) - 0.5)  # [C]
    blob_colours = rand(3, C) - 0.5  # [3, C]
    image = (
        background[:, None, None]
        + stripe_colour[:, None, None] * stripes
        + torch.einsum("kc,khw->chw", blob_colours, blobs)
    )  # [C, H, W]
    return image.clamp_(0, 1)
