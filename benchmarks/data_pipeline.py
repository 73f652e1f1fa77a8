"""The input side: how many images/s the pretraining pipeline delivers from a folder of JPEGs.

Three pipelines, each timed in one process ("per worker") and through a DataLoader with several
worker processes ("total"):

- `openmae`: `ImageFolderDataset` + `pretrain_transform` alone (full-size decode to float,
  RandomResizedCrop 0.2-1 bicubic, flip, normalise), the path of non-JPEG files.
- `draft`: the same augmentation from a reduced-size decode (`openmae.data.jpeg`, what training
  on JPEG folders uses unless `data.fast_decode=false`): the crop is drawn first (it needs only
  the image size in the header), then the JPEG decoder scales by 1/2, 1/4 or 1/8 in the DCT
  domain as long as the crop keeps at least the output size, and PIL crops and resizes in one
  call. The output differs from a full decode only by resampling detail.
- `draft x k`: repeated sampling, k crops of one decoded image (several views per read).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from openmae.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, find_images, pretrain_transform
from openmae.data.jpeg import draft_crops, to_normalized_tensor
from openmae.data.samples import make_photo_folder


class DraftCropImages(Dataset):
    """JPEG files as `[views, 3, size, size]` normalised crops from one reduced-size decode each."""

    def __init__(self, files: Sequence[Path], size: int = 224, views: int = 1) -> None:
        self.files, self.size, self.views = list(files), size, views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        crops = draft_crops(self.files[index], self.size, self.views)
        return torch.stack([to_normalized_tensor(c, IMAGENET_MEAN, IMAGENET_STD) for c in crops])


class Cycle(Dataset):
    """`length` items taken round-robin from `dataset` (a small folder read many times)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def _images_in(item) -> int:
    """Images in one dataset item: `(image, label)` is one; a `[views, C, H, W]` stack is `views`."""
    if isinstance(item, tuple):
        return 1
    return item.shape[0] if item.dim() == 4 else 1


def per_worker_rate(dataset: Dataset, items: int) -> float:
    """Images/s of `dataset[i]` in this process with one thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]
        images = 0
        start = time.perf_counter()
        for i in range(1, items + 1):
            images += _images_in(dataset[i % len(dataset)])
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _collate(items: list) -> torch.Tensor:
    """Stack images from `(image, label)` items or `[views, C, H, W]` items into `[N, C, H, W]`."""
    return torch.cat([item[0][None] if isinstance(item, tuple) else item for item in items])


def loader_rate(dataset: Dataset, workers: int, batch_size: int, batches: int) -> float:
    """Images/s through a DataLoader with `workers` processes, after its first batch."""
    loader = DataLoader(
        Cycle(dataset, batch_size * (batches + 1)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    iterator = iter(loader)
    next(iterator)  # starts the workers
    images = 0
    start = time.perf_counter()
    for batch in iterator:
        images += batch.shape[0]
    return images / (time.perf_counter() - start)


def data_benchmark(
    folder: str | Path | None,
    img_size: int = 224,
    workers: int = 2,
    items: int = 64,
    batch_size: int = 16,
    views: int = 4,
) -> dict:
    """Time the three pipelines on the JPEGs under `folder` (default: sample photos in a temp dir).

    Returns `{"folder", "files", "workers", "rows": [{"pipeline", "per_worker", "total"}]}`
    in images/s; `items` dataset items are read per worker and for the loader.
    """
    with tempfile.TemporaryDirectory(prefix="openmae-bench-") as tmp:
        root = Path(folder) if folder is not None else make_photo_folder(tmp)
        files = find_images(root)
        pipelines = [  # (name, dataset, images per item)
            (
                "full decode, float RRC (data.fast_decode=false)",
                ImageFolderDataset(
                    root,
                    pretrain_transform(img_size, IMAGENET_MEAN, IMAGENET_STD),
                    channels="rgb",
                    labels="none",
                ),
                1,
            ),
            ("draft decode + PIL crop-resize (openmae default)", DraftCropImages(files, img_size), 1),
            (f"draft decode, {views} views per decode", DraftCropImages(files, img_size, views), views),
        ]
        batches = max(1, items // batch_size)
        rows = []
        for name, dataset, per_item in pipelines:
            per_worker = per_worker_rate(dataset, max(1, items // per_item))
            total = loader_rate(dataset, workers, max(1, batch_size // per_item), batches)
            rows.append({"pipeline": name, "per_worker": per_worker, "total": total})
        where = str(folder) if folder is not None else "sample photos (temp dir)"
        return {"folder": where, "files": len(files), "workers": workers, "rows": rows}
