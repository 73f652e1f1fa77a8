"""`probe_images`: a sample of a dataset read before a run writes anything."""

import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.data import ImageFolderDataset, UnreadableImageWarning
from openmae.data.probe import probe_images
from openmae.data.transforms import eval_transform


def folder(tmp_path, good, bad):
    for i in range(good):
        Image.fromarray(np.full((20, 20, 3), i * 10, np.uint8)).save(tmp_path / f"good{i}.png")
    for i in range(bad):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    return ImageFolderDataset(tmp_path, eval_transform(16, (0.5,) * 3, (0.5,) * 3, None), channels=3)


def test_a_dataset_of_unreadable_files_is_an_error_naming_one(tmp_path):
    with pytest.raises(ValueError, match=r"none of the 5 training images sampled could be read: .*bad\d.png"):
        probe_images(folder(tmp_path, 0, 5), (3, 16, 16), "training images")


def test_images_of_another_shape_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"are \[3, 16, 16\] but the model takes \[1, 16, 16\]"):
        probe_images(folder(tmp_path, 2, 0), (1, 16, 16), "training images")


def test_some_unreadable_files_pass_warned_once_and_the_rngs_are_left_alone(tmp_path):
    dataset = folder(tmp_path, 3, 2)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with pytest.warns(UnreadableImageWarning) as caught:
        probe_images(dataset, (3, 16, 16), "training images")
    assert len(caught) == 2
    assert (torch.rand(1), random.random(), np.random.rand()) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[[p.name for p, _ in dataset.samples].index("bad0.png")] is None  # no second warning
