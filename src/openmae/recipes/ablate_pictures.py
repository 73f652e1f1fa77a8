"""Figure-6 style pictures: what each variant's masking hides, and what its model rebuilds.

One row per held-out image; after the original, two columns per variant: the masked input (each
variant's own sampler and ratio) and the reconstruction pasted into the visible patches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openmae import viz
from openmae.config import config_from_dict
from openmae.data import build_dataset, dataset_mean_std
from openmae.interop import load_checkpoint
from openmae.recipes.ablate import Job, Run
from openmae.recipes.ablate_study import Study
from openmae.recipes.pretrain import PretrainConfig, build_pretrain_model


def mask_pictures(
    study: Study, runs: list[Run], jobs: dict[str, Job], path: Path, images: int = 4, seed: int = 0
) -> Path | None:
    """Write the picture of every variant with a finished pretraining (its first seed's); None if none has."""
    columns = []  # (variant name, hidden share, masked [B, 3, H, W], pasted [B, 3, H, W])
    originals = None
    for variant in study.variants:
        job = next(
            (jobs[r.pretrain] for r in runs if r.variant is variant and r.pretrain and jobs[r.pretrain].done),
            None,
        )
        if job is None:
            continue
        cfg = config_from_dict(PretrainConfig, job.config)
        model = load_checkpoint(job.result()["weights"], build_pretrain_model(cfg))
        img_size, in_chans = model.config.img_size, model.config.in_chans
        heldout = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
        batch = torch.stack([heldout[i][0] for i in range(min(images, len(heldout)))])  # [B, C, H, W]
        shown = viz.reconstruct(model, batch, cfg.mask_ratio, torch.Generator().manual_seed(seed))
        mean, std = dataset_mean_std(cfg.data, in_chans)
        originals = viz.to_display(shown.original, mean, std)
        hidden = float(shown.mask.mean())
        columns.append(
            (
                variant.name,
                hidden,
                viz.to_display(shown.masked, mean, std),
                viz.to_display(shown.pasted, mean, std),
            )
        )
    if not columns:
        return None
    return _draw(originals, columns, path, study.title)


def _draw(originals: torch.Tensor, columns: list, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = originals.shape[0]
    width = 1 + 2 * len(columns)
    figure, axes = plt.subplots(count, width, figsize=(1.3 * width, 1.4 * count + 0.6), squeeze=False)
    for row in range(count):
        panels = [("original", originals[row])]
        for name, hidden, masked, pasted in columns:
            panels += [(f"{name}\n{hidden:.0%} hidden", masked[row]), (f"{name}\nreconstructed", pasted[row])]
        for axis, (label, image) in zip(axes[row], panels, strict=True):
            axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(label, fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["mask_pictures"]
