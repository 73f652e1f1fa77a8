"""A look at a sample of a dataset before a run writes anything.

Unreadable files are skipped during training (and an epoch that reads mostly nothing stops the run),
but a folder in which nothing can be read, or whose images cannot give the model's channels, is a
mistake better reported before the run starts: `probe_images` reads a few random items first.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from openmae.data.folder import UnreadableImageWarning
from openmae.data.sampler import SeededDataset

PROBE_IMAGES = 32  # items read up front: enough to see a folder that is all unreadable, cheap on photos


def probe_images(
    dataset: Dataset, expected_shape: tuple[int, ...], what: str, count: int = PROBE_IMAGES, seed: int = 0
) -> None:
    """Read up to `count` random items of `dataset` (the global RNGs are left as they were).

    Raises ValueError when none of them can be read (naming the first reason), or when a readable
    image is not `expected_shape` (`[C, H, W]`, what the model takes). The unreadable items' warnings
    are shown once the check has passed, so an error comes alone, on one line.
    """
    size = len(dataset)
    if size == 0:
        raise ValueError(f"there are no {what}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    numpy_state = np.random.get_state()  # some augmentations draw from NumPy too
    seeded = SeededDataset(dataset)  # read as training reads them: one view each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [seeded[index, (seed + index,)] for index in order]
    np.random.set_state(numpy_state)
    readable = [item for item in items if item is not None]
    if not readable:
        reasons = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
        first = f": {reasons[0]}" if reasons else ""
        raise ValueError(f"none of the {len(items)} {what} sampled could be read{first}")
    image = readable[0][0]  # [1, C, H, W], or with data.decoder=gpu a JPEG still to be decoded
    if isinstance(image, torch.Tensor) and tuple(image.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"the {what} are {list(image.shape[1:])} but the model takes {list(expected_shape)} [C, H, W]"
        )
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=2)
