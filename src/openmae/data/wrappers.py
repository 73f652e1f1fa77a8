"""Datasets made from other datasets: transformed, subsets, cached features, a user's own.

Every training dataset yields `(image [C, H, W] float, label)` items, or None for an unreadable
file; these wrappers keep that contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset, Subset


class Transformed(Dataset):
    """`(transform(image), label)` of a dataset of `(image, label)` or None (unreadable)."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (self.transform(item[0]), item[1])


class Features(Dataset):
    """Cached features `[N, D]` and labels `[N]` as items `(feature [D], label)`."""

    draws_random = False  # `SeededDataset` reads items without seeding the RNGs

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.labels[index]


class UserImages(Dataset):
    """A user's own dataset, whose items are images `[C, H, W]` or `(image, label)`, as openmae items.

    The first item is checked against the model's input (`[in_chans, *img_size]`, float) when built,
    so a mismatch is an error before training starts, not a traceback from a loader worker.
    """

    def __init__(self, dataset: Dataset, in_chans: int, img_size: tuple[int, int]) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset given is empty")
        self.dataset = dataset
        image, _ = self[0]
        expected = (in_chans, *img_size)
        if (
            not isinstance(image, torch.Tensor)
            or tuple(image.shape) != expected
            or not image.is_floating_point()
        ):
            found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"the dataset's images must be float tensors {list(expected)}; its first is {found}"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is None or isinstance(item, torch.Tensor):
            return None if item is None else (item, -1)
        image, label = item[0], item[1]
        return image, int(label)


def random_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """`size` items drawn without replacement (all of them when `size` is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def num_classes_of(dataset: Dataset) -> int:
    """The class count a dataset (or the dataset a wrapper wraps) declares, as `num_classes` or as a
    list of `classes` (torchvision's datasets); an error for unlabelled data."""
    while (
        not hasattr(dataset, "num_classes")
        and not hasattr(dataset, "classes")
        and hasattr(dataset, "dataset")
    ):
        dataset = dataset.dataset
    count = getattr(dataset, "num_classes", None)
    if count is None:
        count = len(getattr(dataset, "classes", ()))
    if count <= 0:
        raise ValueError(
            "the training images have no labels (class sub-folders): set num_classes and use labelled data"
        )
    return count
