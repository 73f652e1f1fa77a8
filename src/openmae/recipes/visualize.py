"""`mae visualize`: reconstruction grids of a pretrained MAE for given images or a dataset's test split."""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from openmae.checkpoint import read_metadata
from openmae.data import DataConfig, build_dataset, dataset_mean_std, find_images
from openmae.data.folder import UnreadableImageWarning
from openmae.data.images import UnreadableImageError
from openmae.errors import UsageError
from openmae.interop import load_checkpoint
from openmae.models import MaskedAutoencoder
from openmae.recipes.runs import checked


def visualize(
    checkpoint: str | Path,
    images: Sequence[str | Path] = (),
    out: str | Path = "reconstructions.png",
    mask_ratio: float = 0.75,
    seed: int = 0,
    num_images: int = 8,
    dataset: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Write a PNG grid: original | masked | reconstruction | reconstruction + visible patches.

    Normalisation constants come from `mean`/`std`, else from the run config stored in an openmae
    checkpoint, else the dataset defaults for the model's channel count.
    """
    from openmae import viz

    with checked():
        model = load_checkpoint(checkpoint)
        if not isinstance(model, MaskedAutoencoder):
            raise ValueError(
                f"{checkpoint} holds no MAE decoder; reconstructions need a pretraining checkpoint"
            )
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        data_cfg = run_data_config(checkpoint)
        if dataset is not None:
            data_cfg = DataConfig(dataset=dataset)
        in_chans, img_size = model.config.in_chans, model.config.img_size
        default_mean, default_std = dataset_mean_std(data_cfg, in_chans)
        mean, std = tuple(mean or default_mean), tuple(std or default_std)
        if images:
            batch = readable_images(image_files(images), num_images, img_size, in_chans, mean, std)
        else:
            batch = test_images(data_cfg, num_images, img_size, in_chans)
    model.eval()
    return viz.save_reconstruction_grid(model, batch, out, mean, std, mask_ratio=mask_ratio, seed=seed)


def readable_images(files: list[Path], count: int, img_size, in_chans: int, mean, std) -> torch.Tensor:
    """The first `count` files that can be read as `in_chans` channels, as one batch; the others are
    skipped with a warning naming them, and none readable is an error naming the first."""
    from openmae import viz

    images, failures = [], []
    for path in files:
        if len(images) == count:
            break
        try:
            images.append(viz.load_images([path], img_size, in_chans, mean, std))
        except (UnreadableImageError, ValueError) as error:
            failures.append(str(error))
    if not images:
        raise ValueError(failures[0] + ("" if len(failures) == 1 else f" (and {len(failures) - 1} more)"))
    for failure in failures:
        warnings.warn(f"skipped: {failure}", UnreadableImageWarning, stacklevel=3)
    return torch.cat(images)


def test_images(data_cfg: DataConfig, count: int, img_size, in_chans: int) -> torch.Tensor:
    """The first `count` readable images of the test split of the checkpoint's dataset."""
    test_set = build_dataset(data_cfg, "test", img_size, in_chans, train_transform=False)
    if test_set is None:
        raise ValueError("no images given and the checkpoint's dataset has no test split; pass image files")
    items = (test_set[i] for i in range(len(test_set)))
    images = list(itertools.islice((item[0] for item in items if item is not None), count))
    if not images:
        raise ValueError("no image of the checkpoint's test split could be read; pass image files")
    return torch.stack(images)


def run_data_config(checkpoint: str | Path) -> DataConfig:
    """The data section of the run that wrote an openmae checkpoint (defaults for other files)."""
    try:
        config = json.loads(read_metadata(checkpoint).get("run_config", "{}"))
    except (OSError, ValueError):
        return DataConfig()
    data = config.get("data", {})
    known = set(DataConfig.__dataclass_fields__)
    return DataConfig(**{k: v for k, v in data.items() if k in known})


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The given files, and the images inside given folders; a missing path is an error."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += find_images(path)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"image not found: {path}")
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    return files
