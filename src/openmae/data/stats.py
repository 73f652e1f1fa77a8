"""Per-channel pixel mean and standard deviation of a dataset, in one streaming pass.

Each batch's mean and sum of squared deviations are merged into the running totals with Chan et
al.'s pairwise update in float64, which stays accurate over billions of pixels (a naive
sum-of-squares in float32 loses the variance to cancellation).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm


class RunningMoments:
    """Streaming per-channel count, mean and sum of squared deviations (M2) of pixels."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [C] float64
        self.m2: torch.Tensor | None = None  # [C] float64

    def update(self, images: torch.Tensor) -> None:
        """Add a batch `[B, C, H, W]` (or one image `[C, H, W]`)."""
        if images.ndim == 3:
            images = images[None]
        x = images.detach().to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)  # [C, B*H*W]
        n = x.shape[1]
        mean = x.mean(1)
        m2 = ((x - mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"images with {len(mean)} channels after images with {len(self.mean)}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation per channel (what normalisation constants use)."""
        return (self.m2 / self.count).sqrt()


def compute_mean_std(
    dataset: Dataset,
    num_workers: int = 0,
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the images of `dataset` (items `(image [C, H, W], label)` or None).

    Give the dataset without normalisation (images in [0, 1]); images may differ in size.
    `max_images` takes a random subset (drawn from `seed`) instead of every image.
    Unreadable images (None items) are left out.
    """
    if max_images is not None and max_images < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, order[:max_images].tolist())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_images,
        persistent_workers=False,
    )
    moments = RunningMoments()
    with tqdm(total=len(dataset), desc="mean/std", unit="img", disable=not progress) as bar:
        for images, num_items in loader:
            for group in images:
                moments.update(group)
            bar.update(num_items)
    if moments.mean is None:
        raise ValueError("no readable images to compute the mean and std of")
    return tuple(moments.mean.tolist()), tuple(moments.std.tolist())


def _collate_images(batch: list) -> tuple[list[torch.Tensor], int]:
    """Readable images stacked by shape (sizes may differ in a folder), and the number of items."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for item in batch:
        if item is not None:
            image = item[0]
            groups.setdefault(tuple(image.shape), []).append(image)
    return [torch.stack(group) for group in groups.values()], len(batch)
