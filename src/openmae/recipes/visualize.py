"""`mae visualize`: reconstruction grids of a pretrained MAE for given images or a dataset's test split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Subset

from openmae.checkpoint import read_metadata
from openmae.data import DataConfig, build_dataset, dataset_mean_std, find_images
from openmae.errors import UsageError
from openmae.interop import load_checkpoint
from openmae.models import MaskedAutoencoder


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

    try:
        model = load_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    if not isinstance(model, MaskedAutoencoder):
        raise UsageError(f"{checkpoint} holds no MAE decoder; reconstructions need a pretraining checkpoint")
    if not 0 <= mask_ratio < 1:
        raise UsageError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    model.eval()
    data_cfg = run_data_config(checkpoint)
    if dataset is not None:
        data_cfg = DataConfig(dataset=dataset)
    in_chans, img_size = model.config.in_chans, model.config.img_size
    default_mean, default_std = dataset_mean_std(data_cfg, in_chans)
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    if images:
        batch = viz.load_images(image_files(images)[:num_images], img_size, in_chans, mean, std)
    else:
        test_set = build_dataset(data_cfg, "test", img_size, in_chans, train_transform=False)
        if test_set is None:
            raise UsageError(
                "no images given and the checkpoint's dataset has no test split; pass image files"
            )
        subset = Subset(test_set, range(min(num_images, len(test_set))))
        batch = torch.stack([subset[i][0] for i in range(len(subset))])
    return viz.save_reconstruction_grid(model, batch, out, mean, std, mask_ratio=mask_ratio, seed=seed)


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
