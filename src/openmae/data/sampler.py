"""A data order that can be replayed: every sample gets its own random seed.

The sampler yields `(index, sample_seed)` pairs. The seed depends only on (run seed, epoch, global
position in the epoch), and drives that sample's augmentation and masking noise. So:
- a run resumed at step N sees exactly the samples and random draws it would have seen;
- a global batch holds the same samples with the same draws whatever the world size, because rank r
  takes positions r, r + W, r + 2W, ... of the one shuffled epoch (as DistributedSampler does).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.data import Dataset, Sampler

from openmae.data.loader import collate_skip


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at `position` of `epoch` (hash of ints is stable across runs)."""
    return hash((seed, epoch, position)) & (2**63 - 1)


class SeededSampler(Sampler):
    """Shuffled (or sequential) `(index, sample_seed)` pairs for one rank, from a start position.

    Args:
        num_samples: dataset length.
        global_batch: batch size x world size; with `drop_last` the epoch is cut to a multiple of it.
        seed: run seed; the permutation of epoch e is drawn from `seed + e`.
        rank, world_size: this process's shard; rank r takes positions r, r + W, ...
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    @property
    def epoch_length(self) -> int:
        """Samples per epoch over all ranks."""
        if self.drop_last:
            return self.num_samples // self.global_batch * self.global_batch
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip its first `start` positions (when resuming mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        for position in range(self.start + self.rank, self.epoch_length, self.world_size):
            yield order[position], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.epoch_length, self.world_size))


@contextmanager
def seeded_rng(seed: int):
    """Run a block with torch's (CPU) and Python's global RNGs seeded, restoring them afterwards.

    `torch.default_generator.manual_seed` rather than `torch.manual_seed`: the latter also seeds
    every accelerator and costs ~0.4 ms, which adds up at one call per image.
    """
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class SeededDataset(Dataset):
    """Wraps a dataset of `(image, label)` (or None for an unreadable file) to take `(index, seed)`.

    Returns `(image, label, seed)`, with the augmentation drawn from `seed`, or None. A dataset
    whose items involve no randomness says so with a class attribute `draws_random = False` (e.g.
    cached features): its items are then read without seeding, which would cost more than the read.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.seeds_items = getattr(dataset, "draws_random", True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_rng(seed) if self.seeds_items else nullcontext():
            item = self.dataset[index]
        if item is None:
            return None
        image, label = item
        return image, label, seed


def collate_seeded(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`collate_skip` for `(image, label, seed)` items: unreadable ones (None) dropped and counted.

    Returns `(images [B, C, H, W], labels [B], seeds [B], num_skipped)`.
    """
    collated = collate_skip([None if item is None else item[:2] for item in batch])
    seeds = torch.as_tensor([item[2] for item in batch if item is not None], dtype=torch.long)
    return collated.images, collated.labels, seeds, collated.num_skipped
