"""A folder of image files: class sub-folders (ImageFolder layout) or unlabelled images, any nesting.

Unreadable files (truncated, empty, not an image) do not stop training: `__getitem__` returns None
for them, warns once per file, and `collate_skip` drops and counts them.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from openmae import extras
from openmae.data.decode import load_image, load_views
from openmae.data.images import (
    IMAGE_EXTENSIONS,
    Channels,
    UnreadableImageError,
    decode_image,
    is_image_file,
)

Labels = Literal["auto", "folders", "none"]


class UnreadableImageWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


def list_classes(root: str | Path) -> list[str]:
    """Sorted names of the first-level, non-hidden sub-folders of `root` (the class names)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def find_images(root: str | Path) -> list[Path]:
    """All image files under `root`, at any depth, sorted; hidden files and folders are skipped."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # e.g. .ipynb_checkpoints
        found.extend(Path(folder, f) for f in files if is_image_file(f))
    return sorted(found)


def has_class_folders(root: str | Path) -> bool:
    """The ImageFolder layout: no images directly in `root`, and some sub-folder holds images."""
    root = Path(root)
    if any(e.is_file() and is_image_file(e.name) for e in os.scandir(root)):
        return False
    return any(find_images(root / name) for name in list_classes(root))


class ImageFolderDataset(Dataset):
    """Images under `root` as `(image [C, H, W] in [0, 1] then transformed, label)`, or None if unreadable.

    Args:
        root: the folder.
        transform: applied to the decoded float tensor.
        channels: "keep" | "rgb" | "gray" | an int count (see `convert_channels`).
        labels: "folders" labels each image by its first-level sub-folder (sorted names -> 0, 1, ...);
            "none" gives every image label -1; "auto" picks "folders" when `root` has no images of its
            own and some sub-folder has.
        classes: the class names to index by, e.g. the training set's for a validation folder, so
            labels agree even when a split misses a class. Default: the sub-folders of `root`.
        jpeg_transform: decodes and transforms a .jpg / .jpeg file in one step (path -> tensor, e.g.
            `JpegPretrainTransform`, which decodes at reduced size), instead of `read_image` then
            `transform`; other files take the usual path (see `load_image`). It must raise
            `UnreadableImageError`.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels: Channels = "keep",
        labels: Labels = "auto",
        classes: Sequence[str] | None = None,
        jpeg_transform: Callable[[Path], torch.Tensor] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        self.root = root
        self.transform = transform
        self.channels = channels
        self.jpeg_transform = jpeg_transform
        self.samples = self._scan(labels, classes)
        self.targets = [label for _, label in self.samples]
        self._warned: set[Path] = set()
        self._check_tiff_reader()

    def _check_tiff_reader(self) -> None:
        """Without tifffile, fail here (not in a loader worker mid-run) when PIL cannot read the TIFFs."""
        if extras.available("tifffile"):
            return
        first_tiff = next((p for p, _ in self.samples if p.suffix.lower() in (".tif", ".tiff")), None)
        if first_tiff is not None:
            try:
                decode_image(first_tiff)  # raises MissingExtraError, naming the extra to install
            except UnreadableImageError:
                pass  # a damaged file, skipped like any other

    def _scan(self, labels: Labels, classes: Sequence[str] | None) -> list[tuple[Path, int]]:
        if labels == "auto":
            labels = "folders" if has_class_folders(self.root) else "none"
        if labels == "none":
            self.classes: list[str] = []
            samples = [(path, -1) for path in find_images(self.root)]
        else:
            self.classes = list(classes) if classes is not None else list_classes(self.root)
            index = {name: i for i, name in enumerate(self.classes)}
            samples = []
            for name in list_classes(self.root):
                if name not in index:
                    raise ValueError(
                        f"{self.root}: class folder {name!r} is not among the classes {self.classes}"
                    )
                samples.extend((path, index[name]) for path in find_images(self.root / name))
        if not samples:
            where = "the class sub-folders of " if labels == "folders" else ""
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}{self.root}")
        return samples

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        """Number of classes; 0 for unlabelled images."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self._read(index, load_image)

    def views(self, index: int, seeds: Sequence[int]) -> tuple[torch.Tensor, int] | None:
        """`(views [k, C, H, W], label)`: the file decoded once, view i augmented under `seeds[i]`
        (`SeededDataset` calls it), or None for an unreadable file."""
        return self._read(index, functools.partial(load_views, seeds=seeds))

    def _read(self, index: int, load: Callable) -> tuple[torch.Tensor, int] | None:
        """`load(path, channels=, transform=, jpeg_transform=)` of item `index` with its label, or
        None for an unreadable file."""
        path, label = self.samples[index]
        try:
            image = load(
                path, channels=self.channels, transform=self.transform, jpeg_transform=self.jpeg_transform
            )
        except UnreadableImageError as error:
            # Each worker process holds its own copy of `_warned`, so a file warns at most once per worker.
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"skipping unreadable image {path}: {error.__cause__ or error}", UnreadableImageWarning, 3
                )
            return None
        return image, label
