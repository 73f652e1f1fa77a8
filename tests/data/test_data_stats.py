"""Streaming per-channel mean/std against a direct computation."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from openmae.data import ImageFolderDataset, RunningMoments, compute_mean_std


class ListDataset(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return None if self.images[i] is None else (self.images[i], 0)


def direct(images):
    pixels = torch.cat([x.double().flatten(1) for x in images if x is not None], dim=1)  # [C, all pixels]
    return pixels.mean(1), pixels.std(1, unbiased=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_matches_direct_computation_with_mixed_sizes_and_skips(num_workers):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 5 + i % 4, 7 + i % 3, generator=g) * (i + 1) / 20 for i in range(20)]
    images[3] = None  # an unreadable file
    mean, std = compute_mean_std(ListDataset(images), num_workers=num_workers, batch_size=6, progress=False)
    ref_mean, ref_std = direct(images)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref_mean)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref_std)


def test_stable_with_a_large_offset():
    # Values near 1e4 with spread 1e-2: the naive E[x^2] - E[x]^2 in float32 is pure rounding noise.
    g = torch.Generator().manual_seed(0)
    moments = RunningMoments()
    chunks = [1e4 + 1e-2 * torch.randn(2, 64, 64, generator=g, dtype=torch.float64) for _ in range(10)]
    for chunk in chunks:
        moments.update(chunk.float())
    pixels = torch.stack([c.float().double() for c in chunks]).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(moments.std, pixels.std(1, unbiased=False), rtol=1e-6, atol=0)


def test_max_images_takes_a_seeded_subset():
    images = [torch.full((1, 2, 2), float(i)) for i in range(10)]
    first = compute_mean_std(ListDataset(images), max_images=3, progress=False)
    assert first == compute_mean_std(ListDataset(images), max_images=3, progress=False)
    assert first != compute_mean_std(ListDataset(images), max_images=3, seed=1, progress=False)
    assert first[0][0] in {sum(c) / 3 for c in itertools.combinations(range(10), 3)}


def test_on_a_folder_of_differently_sized_images(tmp_path):
    arrays = [np.full((4 + i, 6, 3), 50 * i, np.uint8) for i in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    mean, _ = compute_mean_std(ImageFolderDataset(tmp_path), progress=False)
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays]) / 255
    assert mean == pytest.approx(tuple(pixels.mean(0)))


def test_channel_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="channels"):
        compute_mean_std(
            ListDataset([torch.rand(1, 2, 2), torch.rand(3, 2, 2)]), batch_size=1, progress=False
        )
    with pytest.raises(ValueError, match="no readable images"):
        compute_mean_std(ListDataset([None]), progress=False)
