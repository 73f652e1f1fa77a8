"""Fashion-MNIST (Xiao et al., 2017) from its IDX files, held in memory as uint8 tensors.

The files are looked for in, in order: the folder you give; the Debian/Ubuntu package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/); and, only with `download=True`,
torchvision's downloader. Files may be gzipped or not.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_DIR = Path("~/.cache/openmae/fashion-mnist")

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Pixel mean and (population) std of the 60,000 training images scaled to [0, 1], over all 47M
# pixels, computed once with `compute_mean_std(FashionMNIST(split="train"))` on the Debian files
# (a direct float64 mean/std of the whole uint8 array / 255 agrees to 1e-8).
MEAN = 0.2860406
STD = 0.3530242

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (gzipped or not: detected from its first bytes) into a tensor of its shape."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ValueError(f"{path}: size does not match its header shape {shape}")
    array = np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_fashion_mnist(root: str | Path | None = None, download: bool = False) -> Path:
    """The folder holding the four IDX files, downloading them with torchvision if allowed.

    `root` (when given) is the only place looked in, also for a torchvision layout under it
    (`FashionMNIST/raw/`); without it, the Debian folder then the download cache are tried.
    """
    if root is not None:
        places = [Path(root).expanduser()]
    else:
        places = [DEBIAN_DIR, DEFAULT_DOWNLOAD_DIR.expanduser()]
    for place in places:
        for folder in (place, place / "FashionMNIST" / "raw"):
            if _has_files(folder):
                return folder
    if download:
        target = places[-1]
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            TorchvisionFashionMNIST(str(target), train=True, download=True)
            TorchvisionFashionMNIST(str(target), train=False, download=True)
        except Exception as error:  # no network, proxy, checksum...
            raise FileNotFoundError(f"downloading Fashion-MNIST to {target} failed: {error}") from error
        return target / "FashionMNIST" / "raw"
    looked = ", ".join(str(p) for p in places)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found (looked in {looked}). Either give the folder holding "
        "train-images-idx3-ubyte[.gz] etc. as the data path, install the Debian/Ubuntu package "
        f"dataset-fashion-mnist (files in {DEBIAN_DIR}), or pass download=True (data.download=true) "
        "to fetch them with torchvision where a network is available."
    )


def _has_files(folder: Path) -> bool:
    return all(_find_file(folder, name) is not None for pair in _FILES.values() for name in pair)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST as `(image [C, 28, 28] float in [0, 1] then transformed, label)`.

    Args:
        root: folder with the IDX files (see `find_fashion_mnist` for where else it looks).
        split: "train" (60,000 images) or "test" (10,000).
        transform: applied to the float image.
        channels: 1, or 3 to repeat the gray channel for RGB models ("gray"/"rgb"/"keep" accepted too).
        download: allow torchvision to download the files when they are not found.
    """

    classes = list(CLASSES)

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels: int | str = 1,
        download: bool = False,
    ) -> None:
        if split not in _FILES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        num_channels = {"keep": 1, "gray": 1, "rgb": 3}.get(channels, channels)
        if num_channels not in (1, 3):
            raise ValueError(f"Fashion-MNIST gives 1 or 3 channels, got channels={channels!r}")
        folder = find_fashion_mnist(root, download)
        image_file, label_file = (_find_file(folder, name) for name in _FILES[split])
        self.images = read_idx(image_file)  # [N, 28, 28] uint8
        self.targets = read_idx(label_file).long()  # [N]
        if self.images.dtype != torch.uint8 or self.images.ndim != 3 or len(self.images) != len(self.targets):
            raise ValueError(f"{image_file} / {label_file} do not hold matching uint8 images and labels")
        self.split = split
        self.transform = transform
        self.num_channels = num_channels

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index][None].float().div_(255)  # [1, 28, 28]
        if self.num_channels == 3:
            image = image.repeat(3, 1, 1)  # [3, 28, 28]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
