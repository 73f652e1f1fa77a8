"""`mae knn`: weighted k-NN accuracy of an encoder's frozen features (k=20, cosine, T=0.07).

The memory bank is the training split (eval transform), the queries the validation split.
`KnnMonitor` runs the same measurement every few epochs of pretraining (`knn_every`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from openmae.data import DataConfig, build_dataset, build_loader
from openmae.distributed import init_distributed
from openmae.engine.features import Pool
from openmae.engine.knn import knn_accuracy
from openmae.errors import UsageError
from openmae.models.vit import VisionTransformer
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


class KnnMonitor:
    """k-NN accuracy of the encoder every `every` epochs of pretraining (and after the last one).

    Built from the pretraining config (`knn_every`, `knn_images`): the memory bank is a fixed
    random subset of the labelled training images, the queries one of the validation images, both
    with the evaluation transform.
    """

    def __init__(self, every: int, bank: DataLoader, queries: DataLoader, num_classes: int) -> None:
        self.every = every
        self.bank = bank
        self.queries = queries
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, img_size, in_chans: int) -> KnnMonitor | None:
        """None when `cfg.knn_every` is 0. Raises ValueError for data without labels or validation."""
        if cfg.knn_every < 0 or cfg.knn_images < 1:
            raise ValueError(f"knn_every must be >= 0 and knn_images >= 1: {cfg.knn_every}, {cfg.knn_images}")
        if not cfg.knn_every:
            return None
        bank = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=False)
        queries = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
        if queries is None:
            raise ValueError("knn_every needs validation images (data.val_path for folders)")
        num_classes = num_classes_of(bank)
        bank, queries = (
            random_subset(bank, cfg.knn_images, cfg.seed),
            random_subset(queries, cfg.knn_images, cfg.seed),
        )
        batch = min(256, cfg.knn_images)
        return cls(cfg.knn_every, build_loader(bank, batch), build_loader(queries, batch), num_classes)

    def __call__(self, model: VisionTransformer, epoch: int, last: bool, device: torch.device) -> dict:
        """`{"knn_top1", "knn_top5"}` when epoch `epoch` (0-based) is due, else `{}`."""
        if not ((epoch + 1) % self.every == 0 or last):
            return {}
        return knn_accuracy(model, self.bank, self.queries, device, self.num_classes)


__all__ = ["KnnConfig", "KnnMonitor", "knn"]
