"""A data order that can be replayed: every sample gets its own random seed.

The sampler yields `(index, seeds)` pairs, one seed per augmented view of the image. A seed depends
only on (run seed, epoch, global position in the epoch), and drives that sample's augmentation and
masking noise. So:
- a run resumed at step N sees exactly the samples and random draws it would have seen;
- a global batch holds the same samples with the same draws whatever the world size, because rank r
  takes positions r, r + W, r + 2W, ... of the one shuffled epoch (as DistributedSampler does).

Repeated views (`views = k`, MAE-ST's repeated sampling, DeiT's repeated augmentation): each image
read gives k training samples, its k views, at sample positions p k, ..., p k + k - 1 for image
position p. An epoch keeps its length in training samples, so it reads 1/k of the images: the k
epochs of a *pass* share one shuffle and take its consecutive parts, so every image is read once
per pass, and `epochs` keeps meaning the same amount of training ("effective epochs").
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at `position` of `epoch` (hash of ints is stable across runs)."""
    return hash((seed, epoch, position)) & (2**63 - 1)


def view_seeds(seed: int, epoch: int, image_position: int, views: int) -> tuple[int, ...]:
    """The seeds of the `views` samples made from the image at `image_position` of `epoch`."""
    return tuple(sample_seed(seed, epoch, image_position * views + view) for view in range(views))


class SeededSampler(Sampler):
    """Shuffled `(index, seeds)` pairs for one rank, from a start position.

    Args:
        num_samples: dataset length (images).
        global_batch: training samples per step (views count) over all ranks; the epoch is cut to
            a multiple of it.
        seed: run seed; the permutation of pass p (epochs p k to p k + k - 1) is drawn from `seed + p`.
        rank, world_size: this process's shard; rank r takes image positions r, r + W, ...
        views: training samples (augmented views) per image read, k; `global_batch` is a multiple.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        views: int = 1,
    ) -> None:
        if global_batch % views:
            raise ValueError(f"a global batch of {global_batch} samples is not whole images of {views} views")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.views = views
        self.epoch = 0
        self.start = 0

    @property
    def epoch_length(self) -> int:
        """Training samples per epoch over all ranks (views count: images when `views=1`)."""
        return self.num_samples // self.global_batch * self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip its first `start` samples (when resuming mid-epoch; a
        multiple of the global batch)."""
        self.epoch = epoch
        self.start = start

    def _positions(self) -> range:
        """This rank's image positions in the epoch."""
        images = self.epoch_length // self.views
        return range(self.start // self.views + self.rank, images, self.world_size)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        pass_, part = divmod(self.epoch, self.views)
        generator = torch.Generator().manual_seed(self.seed + pass_)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        first = part * (self.epoch_length // self.views)  # where this epoch's part of the pass begins
        for position in self._positions():
            yield order[first + position], view_seeds(self.seed, self.epoch, position, self.views)

    def __len__(self) -> int:
        return len(self._positions())


@contextmanager
def seeded_rng(seed: int):
    """Run a block with torch's (CPU), Python's and NumPy's global RNGs seeded, restoring them afterwards
    (torchvision's transforms draw from torch, timm's RandAugment from Python and NumPy).

    `torch.default_generator.manual_seed` rather than `torch.manual_seed`: the latter also seeds
    every accelerator and costs ~0.4 ms, which adds up at one call per image.
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SeededDataset(Dataset):
    """Wraps a dataset of `(image, label)` (or None for an unreadable file) to take `(index, seeds)`.

    Returns `(views [k, C, H, W], label, seeds)`, view i augmented from `seeds[i]`, or None. A
    dataset that decodes its images (folders, HF datasets) offers `views(index, seeds)`, which
    decodes once and augments k times; other items are read once per seed, under it. A dataset
    whose items involve no randomness says so with a class attribute `draws_random = False` (e.g.
    cached features): its items are then read without seeding, which would cost more than the read.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.seeds_items = getattr(dataset, "draws_random", True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]):
        index, seeds = key
        if hasattr(self.dataset, "views"):
            item = self.dataset.views(index, seeds)
            return None if item is None else (*item, seeds)
        items = []
        for seed in seeds:
            with seeded_rng(seed) if self.seeds_items else nullcontext():
                items.append(self.dataset[index])
        if any(item is None for item in items):
            return None
        return torch.stack([image for image, _ in items]), items[0][1], seeds


def collate_seeded(batch: list, views: int = 1) -> tuple:
    """`(views [k, C, H, W], label, seeds)` items, or None (unreadable: its k samples dropped and
    counted), as one micro-batch: view j of item i in row i k + j.

    Returns `(images [B, C, H, W], labels [B], seeds [B], num_skipped)`. Images that are still to
    be decoded (`data.decoder=gpu`: `gpu.PendingJpeg`) stay a list of the items' views, which
    the feed decodes on the device (see `gpu.GpuDecodedFeed`).
    """
    items = [item for item in batch if item is not None]
    skipped = (len(batch) - len(items)) * views
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    images, labels, seeds = zip(*items, strict=True)
    per_item = torch.as_tensor([len(group) for group in seeds])
    labels = torch.as_tensor(labels, dtype=torch.long).repeat_interleave(per_item)
    seeds = torch.as_tensor([seed for group in seeds for seed in group], dtype=torch.long)
    decoded = all(isinstance(image, torch.Tensor) for image in images)
    return (torch.cat(images) if decoded else list(images)), labels, seeds, skipped
