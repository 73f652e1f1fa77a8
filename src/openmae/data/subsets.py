"""Class-balanced labelled subsets: "what if only 1% of the images had labels?".

The subset keeps the same share of every class (or the same count per class), drawn by a seeded
permutation, so a seed names one subset on any machine and the class balance of the full set is
kept even at 1% (a plain random 1% of Fashion-MNIST's 60,000 images leaves some classes at 45
images and others at 75).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset


def balanced_indices(
    labels: Sequence[int] | torch.Tensor,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of a class-balanced subset, in increasing order. Give `fraction` or `per_class`.

    Every class keeps `round(fraction * its count)` items (at least one), or `per_class` items
    (all of them when it has fewer); which ones is decided by a permutation drawn from `seed` alone.

    Raises:
        ValueError: neither or both of `fraction` and `per_class`, or a value out of range.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give one of fraction and per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    labels = torch.as_tensor(labels).long()  # [N]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # [N]
    chosen = []
    for label in torch.unique(labels).tolist():
        members = order[labels[order] == label]  # this class's items, in the seed's order
        count = per_class if per_class is not None else max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[:count])
    return sorted(torch.cat(chosen).tolist()) if chosen else []


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item of `dataset`, read without loading an image.

    Looks through `Subset`s and wrappers that keep the wrapped dataset as `.dataset` (with the same
    items in the same order) down to a dataset with `targets`.
    """
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long().tolist()
    if hasattr(dataset, "dataset"):
        return dataset_labels(dataset.dataset)
    raise ValueError(f"cannot read the labels of a {type(dataset).__name__} (it has no `targets`)")


def balanced_subset(
    dataset: Dataset, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> Subset:
    """`dataset` cut to the class-balanced subset of `balanced_indices`."""
    return Subset(dataset, balanced_indices(dataset_labels(dataset), fraction, per_class, seed))


__all__ = ["balanced_indices", "balanced_subset", "dataset_labels"]
