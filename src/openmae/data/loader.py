"""DataLoader construction and the collate function that drops unreadable images and counts them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from openmae import hardware


class Batch(NamedTuple):
    """A collated batch. `images` is `[B, C, H, W]`; B is 0 when every file of the batch was unreadable."""

    images: torch.Tensor  # [B, C, H, W]
    labels: torch.Tensor  # [B] int64, -1 for unlabelled images
    num_skipped: int  # unreadable files dropped from this batch


def collate_skip(batch: list[tuple[torch.Tensor, int] | None]) -> Batch:
    """Stack `(image, label)` items, dropping None (unreadable) ones and counting them.

    The count travels with the batch, so a training loop can sum skips per epoch even when the
    files are read in worker processes.
    """
    items = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(items)
    if not items:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), num_skipped)
    images, labels = zip(*items, strict=True)
    return Batch(torch.stack(images), torch.as_tensor(labels, dtype=torch.long), num_skipped)


def default_num_workers() -> int:
    """Data-loading processes when not set: one per CPU core left after the training process,
    at least 2 (decoding overlaps the model step even on a 2-core laptop), at most 8."""
    return min(8, max(2, hardware.usable_cores() - 1))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader yielding `Batch(images, labels, num_skipped)` from `collate_skip`.

    The order (with `shuffle`) and the workers' random seeds come from a generator seeded with
    `seed`, so two loaders built alike give the same batches (with `num_workers=0` augmentation
    draws from the caller's global RNG instead). A `sampler` (e.g. distributed)
    replaces `shuffle`. Memory is pinned only when CUDA is there; workers persist across epochs.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=hardware.cuda_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
