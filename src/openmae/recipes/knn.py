"""`mae knn`: weighted k-NN accuracy of an encoder's frozen features (k=20, cosine, T=0.07).

The memory bank is the training split (eval transform), the queries the validation split.
`KnnMonitor` runs the same measurement every few epochs of pretraining (`knn_every`).

Under torchrun every rank encodes its own shard of the bank and of the queries; the bank is then
gathered to every rank and the hits summed over them (see `knn_accuracy`), so the accuracy is that
of one process, with each query counted once. Rank 0 writes the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from openmae.data import DataConfig, build_dataset, build_loader
from openmae.data.probe import probe_images
from openmae.data.wrappers import UserImages, num_classes_of, random_subset
from openmae.distributed import ShardedEvalSampler, is_main_process
from openmae.engine.knn import knn_accuracy
from openmae.interop import load_encoder
from openmae.models.vit import GlobalPool, VisionTransformer
from openmae.recipes.runs import checked, join_run


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
    img_size: int | tuple[int, int] | None = field(
        default=None, metadata={"help": "image side, or height,width (None: the checkpoint's)"}
    )
    num_classes: int | None = field(default=None, metadata={"help": "classes (None: the dataset's)"})
    k: int = field(default=20, metadata={"help": "neighbours that vote"})
    temperature: float = field(default=0.07, metadata={"help": "votes weigh exp(cosine / temperature)"})
    pool: GlobalPool = field(default="token", metadata={"help": "token (cls) | avg (mean of patch tokens)"})
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


def knn(cfg: KnnConfig, dataset: Dataset | None = None) -> dict:
    """k-NN top-1 / top-5 (percent) of `cfg.checkpoint`'s features; returns the metrics.

    `dataset` (labelled images `[C, H, W]` at the encoder's size) replaces `cfg.data`'s training
    images as the memory bank; the queries are still `cfg.data`'s validation images.
    """
    device = join_run(cfg).device
    with checked():
        torch.manual_seed(cfg.seed)
        encoder = load_encoder(cfg.checkpoint, cfg.model, cfg.num_heads, cfg.img_size).to(device)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        if dataset is not None:
            bank = UserImages(dataset, in_chans, img_size)
        else:
            bank = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=False)
        queries = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
        if queries is None:
            raise ValueError("validation images are needed (data.val_path for folders)")
        num_classes = cfg.num_classes or num_classes_of(bank)
        bank, queries = (
            random_subset(bank, cfg.train_images, cfg.seed),
            random_subset(queries, cfg.val_images, cfg.seed),
        )
        probe_images(bank, (in_chans, *img_size), "memory-bank images", seed=cfg.seed)
        probe_images(queries, (in_chans, *img_size), "query images", seed=cfg.seed)
    workers = cfg.data.resolved_num_workers()
    metrics = knn_accuracy(
        encoder,
        build_loader(bank, cfg.batch_size, num_workers=workers, sampler=bank_shard(bank)),
        build_loader(queries, cfg.batch_size, num_workers=workers, sampler=ShardedEvalSampler(len(queries))),
        device,
        num_classes,
        cfg.k,
        cfg.temperature,
        cfg.pool,
    )
    metrics |= {"bank_images": len(bank), "query_images": len(queries)}
    if cfg.output and is_main_process():
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


def bank_shard(bank: Dataset) -> ShardedEvalSampler:
    """This rank's block of the bank: gathered in rank order, the blocks give the bank in dataset order."""
    return ShardedEvalSampler(len(bank), contiguous=True)


class KnnMonitor:
    """k-NN accuracy of the encoder every `every` epochs of pretraining (and after the last one).

    Built from the pretraining config (`knn_every`, `knn_images`): the memory bank is a fixed
    random subset of the labelled training images, the queries one of the validation images, both
    with the evaluation transform. Under torchrun every rank calls it at the same epochs, and
    each encodes only its shard of the two subsets (see `knn_accuracy`).
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
        bank_loader = build_loader(bank, batch, sampler=bank_shard(bank))
        query_loader = build_loader(queries, batch, sampler=ShardedEvalSampler(len(queries)))
        return cls(cfg.knn_every, bank_loader, query_loader, num_classes)

    def __call__(self, model: VisionTransformer, epoch: int, last: bool, device: torch.device) -> dict:
        """`{"knn_top1", "knn_top5"}` when epoch `epoch` (0-based) is due, else `{}`. Every rank calls."""
        if not ((epoch + 1) % self.every == 0 or last):
            return {}
        return knn_accuracy(model, self.bank, self.queries, device, self.num_classes)


__all__ = ["KnnConfig", "KnnMonitor", "knn"]
