"""`mae eval`: top-1 / top-5 of a classifier checkpoint on a labelled folder or Fashion-MNIST's test split.

Under torchrun every rank scores its own shard of the images and the counts are summed over the
ranks (see `classification_metrics`); rank 0 writes the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Subset

from openmae.data import DataConfig, build_dataset, build_loader
from openmae.data.probe import probe_images
from openmae.data.wrappers import num_classes_of
from openmae.distributed import ShardedEvalSampler, is_main_process
from openmae.engine.evaluate import classification_metrics
from openmae.errors import UsageError
from openmae.interop import load_checkpoint
from openmae.interop.load import NoClassifierHeadError
from openmae.recipes.runs import checked, join_run


@dataclass
class EvalConfig:
    """Top-1 / top-5 of a classifier checkpoint on labelled images."""

    checkpoint: str = field(metadata={"help": "classifier weights (openmae, reference, timm, HF)"})
    split: str = field(default="val", metadata={"help": "val (= test) | train"})
    num_heads: int | None = field(
        default=None, metadata={"help": "attention heads, for files that do not store it"}
    )
    img_size: int | tuple[int, int] | None = field(
        default=None, metadata={"help": "image side, or height,width (None: the checkpoint's)"}
    )
    batch_size: int = field(default=256, metadata={"help": "images per batch"})
    max_images: int | None = field(default=None, metadata={"help": "score only the first N images"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    output: str | None = field(default=None, metadata={"help": "also write the metrics to this JSON file"})
    data: DataConfig = field(default_factory=DataConfig)


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.checkpoint` on `cfg.data`'s split; returns `{"loss", "top1", "top5", "images"}`."""
    device = join_run(cfg).device
    with checked():
        overrides = {"num_heads": cfg.num_heads} if cfg.num_heads else {}
        try:
            model = load_checkpoint(cfg.checkpoint, kind="classifier", img_size=cfg.img_size, **overrides)
        except NoClassifierHeadError as error:
            raise UsageError(
                f"{cfg.checkpoint} has no classifier head (a pretraining or encoder checkpoint): train "
                "one with mae linprobe or mae finetune, then evaluate the model.safetensors they write"
            ) from error
        dataset = build_dataset(
            cfg.data, cfg.split, model.config.img_size, model.config.in_chans, train_transform=False
        )
        if dataset is None:
            raise ValueError("no images to score: set data.val_path (folders) or data.dataset")
        if cfg.max_images is not None:
            dataset = Subset(dataset, range(min(cfg.max_images, len(dataset))))
        probe_images(dataset, (model.config.in_chans, *model.config.img_size), "images to score")
        check_labels(dataset, model.config.num_classes)
    shard = ShardedEvalSampler(len(dataset))
    loader = build_loader(dataset, cfg.batch_size, num_workers=cfg.data.resolved_num_workers(), sampler=shard)
    metrics = classification_metrics(model.to(device), loader, device) | {"images": len(dataset)}
    if cfg.output and is_main_process():
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


def check_labels(dataset, classes: int) -> None:
    """ValueError unless `dataset` is labelled (class sub-folders) with at most the head's classes."""
    found = num_classes_of(dataset)
    if found > classes:
        raise ValueError(f"the images have {found} classes but the classifier's head has {classes}")


__all__ = ["EvalConfig", "evaluate"]
