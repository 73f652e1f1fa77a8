"""Logistic regression on raw pixels: the baseline any learned feature has to beat.

Multinomial logistic regression (scikit-learn, L-BFGS) on standardised pixels of the evaluation
transform, with the same labelled subsets as the classification recipes (`train_fraction`,
`train_images`), so it sits in a labels-scarce table next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from openmae.data import DataConfig, build_dataset, build_loader
from openmae.data.subsets import balanced_subset
from openmae.data.wrappers import random_subset
from openmae.errors import UsageError
from openmae.extras import require


@dataclass
class LogregConfig:
    """Logistic regression on pixels."""

    img_size: int = field(default=28, metadata={"help": "image side the pixels are resized to"})
    in_chans: int = field(default=1, metadata={"help": "image channels"})
    C: float = field(default=0.1, metadata={"help": "inverse L2 regularisation strength"})
    max_iter: int = field(default=300, metadata={"help": "L-BFGS iterations"})
    train_fraction: float | None = field(
        default=None, metadata={"help": "train on this share of every class (balanced, drawn from seed)"}
    )
    train_images: int | None = field(
        default=None, metadata={"help": "train on a random subset of this many images (None: all)"}
    )
    val_images: int | None = field(default=None, metadata={"help": "score on this many (None: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the subsets"})
    output: str | None = field(default=None, metadata={"help": "also write the metrics to this JSON file"})
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")


def logreg(cfg: LogregConfig) -> dict:
    """Fit on the (subset of the) training split, score on the validation split; returns the metrics."""
    require("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    try:
        train = build_dataset(cfg.data, "train", cfg.img_size, cfg.in_chans, train_transform=False)
        val = build_dataset(cfg.data, "val", cfg.img_size, cfg.in_chans, train_transform=False)
        if val is None:
            raise ValueError("validation images are needed (data.val_path for folders)")
        if cfg.train_fraction is not None:
            train = balanced_subset(train, cfg.train_fraction, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    train, val = (
        random_subset(train, cfg.train_images, cfg.seed),
        random_subset(val, cfg.val_images, cfg.seed),
    )
    workers = cfg.data.resolved_num_workers()
    x_train, y_train = pixels(train, workers)
    x_val, y_val = pixels(val, workers)
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
    model.fit(scaler.transform(x_train), y_train)
    top1 = 100.0 * float((model.predict(scaler.transform(x_val)) == y_val).mean())
    metrics = {"top1": top1, "train_images": len(y_train), "val_images": len(y_val)}
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


def pixels(dataset: Dataset, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images flattened to rows `[N, C*H*W]` and their labels `[N]`."""
    rows, labels = [], []
    for batch in build_loader(dataset, batch_size=512, num_workers=num_workers):
        rows.append(batch.images.flatten(1).numpy())  # [B, C*H*W]
        labels.append(batch.labels.numpy())
    return np.concatenate(rows).astype(np.float32), np.concatenate(labels)


__all__ = ["LogregConfig", "logreg"]
