"""Linear probing (the paper's protocol): `mae linprobe` and `openmae.recipes.linprobe.linprobe`.

The encoder is frozen; a BatchNorm without affine parameters and a linear layer are trained with
LARS. Without augmentation (the default) the images are encoded once and the head trains on the
cached features, which makes an epoch cost a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from openmae.data import build_dataset, build_loader
from openmae.data.wrappers import Features
from openmae.distributed import ShardedEvalSampler, all_gather_cat
from openmae.engine.classify import build_lars
from openmae.engine.features import extract_features
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import ClassifyTask
from openmae.interop import load_encoder
from openmae.models.vit import GlobalPool, VisionTransformer
from openmae.recipes.classify import (
    ClassifyConfig,
    ClassifyResult,
    build_classifier,
    check_classify_run,
    fit_classifier,
    labelled_data,
    val_loader,
)
from openmae.recipes.runs import checked, join_run, resume_point


@dataclass
class LinprobeConfig(ClassifyConfig):
    """Linear probing (the paper's protocol): a frozen encoder, a BatchNorm + linear head, LARS."""

    augment: bool = field(
        default=False,
        metadata={
            "help": "random-resized crops + flips every epoch (reference); false: features cached once"
        },
    )
    epochs: int = field(default=90, metadata={"help": "training epochs (the schedule spans them)"})
    batch_size: int = field(default=256, metadata={"help": "images per device per micro-step"})
    global_pool: GlobalPool = field(
        default="token", metadata={"help": "token (cls) | avg (mean of patch tokens)"}
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="lars", base_lr=0.1, weight_decay=0.0, warmup_epochs=10)
    )
    output_dir: str = field(
        default="runs/linprobe", metadata={"help": "folder for checkpoints, logs and config"}
    )


def linprobe(cfg: LinprobeConfig, dataset: Dataset | None = None) -> ClassifyResult:
    """Train a linear probe on a frozen encoder as `cfg` says; returns the weights and accuracies.

    `dataset` (images `[C, H, W]` at the encoder's size with their labels) replaces `cfg.data`'s
    training images.
    """
    dist = join_run(cfg)
    with checked():
        check_classify_run(cfg, dist)
        torch.manual_seed(cfg.seed)
        encoder = load_encoder(cfg.checkpoint, cfg.model, cfg.num_heads, cfg.img_size).to(dist.device)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        train_set = None
        if dataset is None:
            train_set = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=cfg.augment)
        data = labelled_data(cfg, train_set, img_size, in_chans, dataset)
        model = build_classifier(encoder, data.num_classes, cfg.global_pool, probe=True)
    resume_from = resume_point(cfg)
    train_data, validation, num_workers = (
        data.train_set,
        val_loader(cfg, data.val_set),
        cfg.data.resolved_num_workers(),
    )
    if not cfg.augment:
        # The encoder is frozen and the images fixed: encode them once, train the head on the features.
        train_data, validation = cache_features(model, train_data, validation, cfg, dist.device)
        num_workers = 0
    return fit_classifier(
        cfg,
        dist,
        "linprobe",
        model,
        train_data,
        validation,
        ClassifyTask(torch.nn.CrossEntropyLoss()),
        lambda model, lr: probe_optimizer(cfg.optim, model, lr),
        resume_from,
        num_workers,
    )


def probe_optimizer(optim: OptimConfig, model: VisionTransformer, lr: float) -> torch.optim.Optimizer:
    if optim.name == "lars":  # with the probe's trust-ratio rules, which timm's defaults miss
        return build_lars(model, lr, optim.weight_decay, optim.momentum)
    return build_optimizer(model, optim, lr)


def cache_features(
    model: VisionTransformer,
    train_set: Dataset,
    val_loader: DataLoader,
    cfg: LinprobeConfig,
    device: torch.device,
) -> tuple[Features, DataLoader]:
    """The pooled features of the training and validation images, and a loader over the latter's.

    Under torchrun each rank encodes only its shard of each set. The training features are gathered
    to every rank, in dataset order (contiguous shards), so the trainer deals them out as it would
    deal the images in one process; the validation features stay sharded as `val_loader` is, for
    `classification_metrics` to sum over the ranks.
    """
    num_workers = cfg.data.resolved_num_workers()
    train_shard = ShardedEvalSampler(len(train_set), contiguous=True)
    train_loader = build_loader(train_set, cfg.eval_batch_size, num_workers=num_workers, sampler=train_shard)
    pool = model.config.global_pool
    features, labels = extract_features(model, train_loader, device, pool, desc="train features")
    train = Features(all_gather_cat(features, via=device), all_gather_cat(labels, via=device))
    if len(train) == 0:
        raise ValueError("no training images to extract features from")
    val = Features(*extract_features(model, val_loader, device, pool, desc="val features"))
    return train, build_loader(val, cfg.eval_batch_size)


__all__ = ["LinprobeConfig", "linprobe"]
