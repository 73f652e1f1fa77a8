"""End-to-end fine-tuning (the paper's recipe), or of the last blocks only (partial fine-tuning):
`mae finetune` and `openmae.recipes.finetune.finetune`.

timm's augmentation (RandAugment, random erasing), mixup / cutmix with label smoothing, drop path,
and AdamW with layer-wise lr decay over the encoder's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision.transforms import v2

from openmae.data import build_dataset, dataset_mean_std
from openmae.data.wrappers import Transformed
from openmae.engine.classify import build_criterion, build_mixup, train_only_last_blocks
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import ClassifyTask
from openmae.models.vit import GlobalPool
from openmae.recipes.classify import (
    ClassifyConfig,
    ClassifyResult,
    build_classifier,
    fit_classifier,
    labelled_data,
    load_classify_encoder,
    val_loader,
)
from openmae.recipes.runs import checked, fitted_batch, join_run, resume_point


@dataclass
class FinetuneConfig(ClassifyConfig):
    """End-to-end fine-tuning (the paper's recipe), or of the last `trainable_blocks` blocks only."""

    trainable_blocks: int | None = field(
        default=None, metadata={"help": "partial fine-tuning: train only the last k blocks (+ norm, head)"}
    )
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate of the last block"})
    mixup: float = field(default=0.8, metadata={"help": "mixup alpha (0: off)"})
    cutmix: float = field(default=1.0, metadata={"help": "cutmix alpha (0: off)"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    auto_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment policy (none: off)"}
    )
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability"})
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "keep an exponential moving average of the weights with this decay (e.g. 0.9998; "
            "timm's ModelEmaV3), validated alongside and saved as ema.safetensors (none: off)"
        },
    )
    epochs: int = field(default=100, metadata={"help": "training epochs (the schedule spans them)"})
    global_pool: GlobalPool = field(
        default="avg", metadata={"help": "token (cls) | avg (mean of patch tokens)"}
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="adamw",
            base_lr=5e-4,
            weight_decay=0.05,
            betas=(0.9, 0.999),
            layer_decay=0.75,
            warmup_epochs=5,
            lr_scaling="sqrt",  # the paper's lr at its batch of 1024, square-root scaled at other sizes
            reference_batch=1024,
        )
    )
    output_dir: str = field(
        default="runs/finetune", metadata={"help": "folder for checkpoints, logs and config"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be between 0 and 1 (e.g. 0.9998), got {self.ema_decay}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(
                f"mixup / cutmix mix a batch with its reverse: batch_size must be even, got {self.batch_size}"
            )


def finetune(cfg: FinetuneConfig, dataset: Dataset | None = None) -> ClassifyResult:
    """Fine-tune an encoder (all of it, or its last blocks) as `cfg` says.

    `dataset` (images `[C, H, W]` at the encoder's size with their labels, augmented by the dataset
    itself) replaces `cfg.data`'s training images.
    """
    dist = join_run(cfg)
    with checked():
        encoder = load_classify_encoder(cfg, dist)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        train_set = None
        if dataset is None:
            raw = build_dataset(cfg.data, "train", img_size, in_chans, raw=True)
            train_set = Transformed(raw, finetune_transform(cfg, img_size, in_chans))
        data = labelled_data(cfg, train_set, img_size, in_chans, dataset)
        mixes = cfg.mixup > 0 or cfg.cutmix > 0  # a batch is mixed with its reverse: an even size
        cfg = fitted_batch(cfg, len(data.train_set), dist, "finetune", multiple=2 if mixes else 1)
        model = build_classifier(
            encoder, data.num_classes, cfg.global_pool, probe=False, drop_path=cfg.drop_path
        )
        if cfg.trainable_blocks is not None:
            train_only_last_blocks(model, cfg.trainable_blocks)
    resume_from = resume_point(cfg)
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, data.num_classes)
    return fit_classifier(
        cfg,
        dist,
        "finetune",
        model,
        data.train_set,
        val_loader(cfg, data.val_set),
        ClassifyTask(build_criterion(mixup, cfg.smoothing), mixup),
        lambda model, lr: build_optimizer(model, cfg.optim, lr),
        resume_from,
        cfg.data.resolved_num_workers(),
        ema_decay=cfg.ema_decay,
    )


def finetune_transform(cfg: FinetuneConfig, img_size, in_chans: int) -> v2.Compose:
    """timm's training pipeline (random-resized crop, flip, RandAugment, random erasing).

    timm's augmentations work on PIL images, so the dataset's float tensor is converted first.
    """
    mean, std = dataset_mean_std(cfg.data, in_chans)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    timm_transform = create_transform(
        input_size=(in_chans, *size),
        is_training=True,
        scale=tuple(cfg.data.crop_scale),
        hflip=0.5 if cfg.data.hflip else 0.0,
        auto_augment=None if (cfg.auto_augment or "none").lower() == "none" else cfg.auto_augment,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        mean=mean,
        std=std,
    )
    keep_a_posterize_bit(timm_transform)
    return v2.Compose([v2.ToPILImage(), timm_transform])


def keep_a_posterize_bit(transform: v2.Compose) -> None:
    """Make RandAugment's posterize keep at least one bit.

    The paper's policy (`...-inc1`) posterizes to `4 - magnitude * 4 / 10` bits, 0 at magnitude 10,
    which `m9-mstd0.5` reaches often; Pillow (from 10) refuses 0 bits with a ValueError mid-run. One
    bit leaves the image almost as black as 0 did in the Pillow the reference code used. Only this
    transform's own ops are changed; timm is left as it is.
    """
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_at_least_one_bit


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    return timm_auto_augment.posterize(img, max(1, bits_to_keep), **kwargs)


__all__ = ["FinetuneConfig", "finetune"]
