"""`mae knn`: weighted k-NN accuracy of an encoder's frozen features (k=20, cosine, T=0.07).

The memory bank is the training split (eval transform), the queries the validation split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openmae.data import DataConfig, build_dataset, build_loader
from openmae.distributed import init_distributed
from openmae.engine.features import Pool
from openmae.engine.knn import knn_accuracy
from openmae.errors import UsageError
from openmae.recipes.classify import build_encoder, num_classes_of, random_subset


@dataclass
class KnnConfig:
    """k-NN classification on frozen features."""

    checkpoint: str | None = field(
        default=None,
        metadata={"help": "encoder weights (openmae, MAE reference .pth, timm, HF); none: random init"},
    )
    model: str | None = field(
        default=None, metadata={"help": "named size to initialise at random (checkpoint=none)"}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "attention heads, for files that do not store it"}
    )
    img_size: int | None = field(default=None, metadata={"help": "image side (None: the checkpoint's)"})
    k: int = field(default=20, metadata={"help": "neighbours that vote"})
    temperature: float = field(default=0.07, metadata={"help": "votes weigh exp(cosine / temperature)"})
    pool: Pool = field(default="token", metadata={"help": "token (cls) | avg (mean of patch tokens)"})
    train_images: int | None = field(
        default=None, metadata={"help": "memory bank size (None: the whole split)"}
    )
    val_images: int | None = field(default=None, metadata={"help": "queries (None: the whole split)"})
    batch_size: int = field(default=256, metadata={"help": "images per feature-extraction batch"})
    seed: int = field(default=0, metadata={"help": "seed of the random subsets (and of a random init)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    output: str | None = field(default=None, metadata={"help": "also write the metrics to this JSON file"})
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(
                f"k must be at least 1 and temperature positive, got {self.k} and {self.temperature}"
            )


def knn(cfg: KnnConfig) -> dict:
    """k-NN top-1 / top-5 (percent) of `cfg.checkpoint`'s features; returns the metrics."""
    device = init_distributed(cfg.device).device
    try:
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.checkpoint, cfg.model, cfg.num_heads, cfg.img_size).to(device)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        bank = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=False)
        queries = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
        if queries is None:
            raise ValueError("validation images are needed (data.val_path for folders)")
        num_classes = num_classes_of(bank)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    bank, queries = (
        random_subset(bank, cfg.train_images, cfg.seed),
        random_subset(queries, cfg.val_images, cfg.seed),
    )
    workers = cfg.data.resolved_num_workers()
    metrics = knn_accuracy(
        encoder,
        build_loader(bank, cfg.batch_size, num_workers=workers),
        build_loader(queries, cfg.batch_size, num_workers=workers),
        device,
        num_classes,
        cfg.k,
        cfg.temperature,
        cfg.pool,
    )
    metrics |= {"bank_images": len(bank), "query_images": len(queries)}
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


__all__ = ["KnnConfig", "knn"]
