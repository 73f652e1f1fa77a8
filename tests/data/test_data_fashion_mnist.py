"""Fashion-MNIST: IDX parsing (gzipped or not), the Debian files, channels, the not-found error."""

import gzip
import struct

import numpy as np
import pytest
import torch

from openmae.data import FashionMNIST, find_fashion_mnist, read_idx
from openmae.data import fashion_mnist as fmnist_module

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 5),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 3),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: two zero bytes, type 0x08, ndim, big-endian dims, data."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_tiny_fashion_mnist(folder, gzipped=True):
    """5 train and 3 test 28x28 images whose pixels encode (split, index), and their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, (image_name, label_name, n) in NAMES.items():
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) * 2 % 10
        for name, array in ((image_name, images), (label_name, labels)):
            if gzipped:
                (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            else:
                (folder / name).write_bytes(idx_bytes(array))
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gzipped", [True, False])
def test_reads_a_tiny_idx_dataset(tmp_path, gzipped):
    data = write_tiny_fashion_mnist(tmp_path, gzipped)
    for split, (images, labels) in data.items():
        dataset = FashionMNIST(tmp_path, split)
        assert len(dataset) == len(labels) and dataset.images.dtype == torch.uint8
        image, label = dataset[1]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        torch.testing.assert_close(image[0], torch.from_numpy(images[1]).float() / 255)
        assert label == labels[1]


def test_three_channels_repeat_the_gray_one(tmp_path):
    write_tiny_fashion_mnist(tmp_path)
    gray, _ = FashionMNIST(tmp_path, "train")[0]
    rgb, _ = FashionMNIST(tmp_path, "train", channels=3)[0]
    assert rgb.shape == (3, 28, 28)
    torch.testing.assert_close(rgb, gray.expand(3, -1, -1))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        FashionMNIST(tmp_path, "train", channels=4)


def test_torchvision_layout_under_the_given_folder(tmp_path):
    write_tiny_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gzipped=False)
    assert find_fashion_mnist(tmp_path) == tmp_path / "FashionMNIST" / "raw"


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="does not match"):
        read_idx(tmp_path / "short")


def test_not_found_error_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_module, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fmnist_module, "DEFAULT_DOWNLOAD_DIR", tmp_path / "no-cache")
    for root in (tmp_path / "given", None):
        with pytest.raises(FileNotFoundError) as info:
            FashionMNIST(root, "train")
        message = str(info.value)
        assert "data path" in message and "dataset-fashion-mnist" in message and "download=True" in message


HAS_DEBIAN_FILES = fmnist_module._has_files(fmnist_module.DEBIAN_DIR)


@pytest.mark.skipif(not HAS_DEBIAN_FILES, reason="Debian package dataset-fashion-mnist not installed")
def test_debian_files():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert train.targets[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels
    pixels = train.images.double() / 255  # the stored normalisation constants come from this
    assert abs(pixels.mean().item() - fmnist_module.MEAN) < 1e-6
    assert abs(pixels.std(unbiased=False).item() - fmnist_module.STD) < 1e-6
