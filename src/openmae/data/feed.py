"""Where the training loop's micro-batches come from: a replayable stream of batches per epoch.

`TrainFeed` is what the loop consumes. `MapFeed` serves a map-style dataset (folders,
Fashion-MNIST, `datasets` on disk, cached features): a seeded shuffle per epoch, dealt out to the
ranks, each sample with its own random seed (see `data.sampler`), read by DataLoader workers.
Streaming sources (tar shards, parquet files) are `data.stream.StreamFeed`s.

With repeated views (`views = k`) a micro-batch of B samples holds B / k images, k augmented views
of each (rows i k ... i k + k - 1 from image i), every view with its own seed, so its own crop,
flip and masking noise.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from openmae.data.sampler import SeededDataset, SeededSampler, collate_seeded
from openmae.distributed import ignore_sigterm

# images [B, C, H, W], labels [B] (-1: unlabelled), per-sample seeds [B], unreadable items skipped
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


class TrainFeed(Protocol):
    """This rank's micro-batches, replayable from any optimizer step."""

    epoch_images: int  # training samples (views) per epoch over all ranks: a multiple of the global batch

    def batches(self, epoch: int, start: int) -> Iterator[MicroBatch]:
        """The micro-batches of `epoch` after its first `start` images (counted over all ranks, a
        multiple of the global batch: where a resumed run continues)."""
        ...

    def close(self) -> None:
        """Stop loader worker processes."""
        ...


class MapFeed:
    """A map-style dataset of `(image, label)` items (None for an unreadable file) as a `TrainFeed`.

    Args:
        dataset: the training items.
        batch_size: training samples per micro-batch on this rank (batch_size / views images).
        global_batch: samples per optimizer step over all ranks (batch x accumulation x world size);
            an epoch is cut to a multiple of it.
        seed: run seed (order and per-sample seeds).
        rank, world_size: this process's share: positions rank, rank + W, ... of the epoch.
        num_workers: DataLoader worker processes.
        pin_memory: page-locked host memory, for a GPU.
        views: augmented views per image read (a divisor of `batch_size`); see `data.sampler`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        views: int = 1,
    ) -> None:
        if batch_size % views:
            raise ValueError(f"a micro-batch of {batch_size} samples is not whole images of {views} views")
        self.sampler = SeededSampler(len(dataset), global_batch, seed, rank, world_size, views)
        self.epoch_images = self.sampler.epoch_length
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_size=batch_size // views,  # images
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=functools.partial(collate_seeded, views=views),
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_sigterm,
            # Its own generator for the workers' base seeds: starting an iterator (every epoch, and at
            # a resume) then draws nothing from the global RNG that drop path draws from.
            generator=torch.Generator().manual_seed(seed),
        )

    def batches(self, epoch: int, start: int) -> Iterator[MicroBatch]:
        self.sampler.set_epoch(epoch, start=start)
        return iter(self.loader)

    def close(self) -> None:
        """End the persistent workers now, on success or error.

        They ignore SIGTERM (see `ignore_sigterm`), so the terminate that Python sends its
        children at exit would not end them, and the exit would wait for them forever.
        """
        iterator = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
