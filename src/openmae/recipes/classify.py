"""Linear probing and (partial) fine-tuning: `mae linprobe` and `mae finetune`.

Both training protocols run through the one `Trainer` and the one evaluation; they differ in five
decisions, each a default of their config:

| | linear probe (`LinprobeConfig`) | fine-tune (`FinetuneConfig`) |
|---|---|---|
| trains | the head (`LinearProbe`) | everything, or the last k blocks |
| head | BatchNorm (no affine) + linear, cls token | linear on the mean token + `fc_norm` |
| optimizer | LARS, base lr 0.1, no weight decay | AdamW, base lr 5e-4, wd 0.05, layer decay 0.75 |
| augmentation | none: features cached once (or crops) | RandAugment, mixup, cutmix, erasing |
| loss | cross-entropy | soft-target cross-entropy, label smoothing 0.1 |

Every run starts from a checkpoint of any format `load_checkpoint` reads, or from a random
initialisation of a named size (`checkpoint=none model=NAME`) as a baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from openmae.config import config_to_dict, save_config
from openmae.data import DataConfig, build_dataset, build_loader, dataset_mean_std
from openmae.data.subsets import balanced_subset
from openmae.distributed import DistInfo, ShardedEvalSampler, all_gather_cat, init_distributed
from openmae.engine.checkpoint import resolve_resume
from openmae.engine.classify import (
    ClassifyTask,
    LinearProbe,
    build_criterion,
    build_lars,
    build_mixup,
    train_only_last_blocks,
)
from openmae.engine.evaluate import classification_metrics
from openmae.engine.features import extract_features
from openmae.engine.loop import Progress, Schedule, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.precision import check_precision
from openmae.engine.schedule import absolute_lr
from openmae.errors import UsageError
from openmae.interop import load_checkpoint, save_checkpoint
from openmae.logging import RunLogger
from openmae.models import create_model
from openmae.models.vit import GlobalPool, VisionTransformer, ViTConfig


@dataclass
class ClassifyConfig(TrainConfig):
    """What linear probing and fine-tuning share."""

    checkpoint: str | None = field(
        default=None,
        metadata={"help": "weights to start from (openmae, MAE reference .pth, timm, HF); none: random init"},
    )
    model: str | None = field(
        default=None, metadata={"help": "named size to initialise at random (checkpoint=none)"}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "attention heads, for reference / timm files that do not store it"}
    )
    img_size: int | None = field(default=None, metadata={"help": "image side (None: the checkpoint's)"})
    num_classes: int | None = field(default=None, metadata={"help": "classes (None: the dataset's)"})
    global_pool: GlobalPool = field(
        default="token", metadata={"help": "token (cls) | avg (mean of patch tokens)"}
    )
    train_images: int | None = field(
        default=None, metadata={"help": "train on a random subset of this many images (None: all)"}
    )
    train_fraction: float | None = field(
        default=None,
        metadata={"help": "train on this share of every class's images (a balanced subset drawn from seed)"},
    )
    val_images: int | None = field(
        default=None, metadata={"help": "validate on a random subset of this many images (None: all)"}
    )
    eval_every: int = field(
        default=1, metadata={"help": "epochs between validations (the last is always one)"}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "images per validation batch"})
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_every < 1:
            raise ValueError("eval_every must be at least 1")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")


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
        )
    )
    output_dir: str = field(
        default="runs/finetune", metadata={"help": "folder for checkpoints, logs and config"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(
                f"mixup / cutmix mix a batch with its reverse: batch_size must be even, got {self.batch_size}"
            )


@dataclass
class ClassifyResult:
    output_dir: Path
    weights: Path
    best_weights: Path
    metrics: dict  # validation metrics of the final weights
    best: dict  # the best validation metrics seen, with their epoch
    progress: Progress


# ------------------------------------------------------------------------------------------------
# Models


def build_encoder(
    checkpoint: str | None, model: str | None, num_heads: int | None = None, img_size: int | None = None
) -> VisionTransformer:
    """The encoder of `checkpoint` (any format), or a random one of the named size `model`."""
    if checkpoint is None or checkpoint.lower() == "none":
        if model is None:
            raise ValueError("give checkpoint=PATH, or checkpoint=none with model=NAME for a random init")
        return create_model(model, **({"img_size": img_size} if img_size else {}))
    overrides = {"num_heads": num_heads} if num_heads else {}
    return load_checkpoint(checkpoint, kind="encoder", img_size=img_size, **overrides)


def build_classifier(
    encoder: VisionTransformer, num_classes: int, global_pool: GlobalPool, probe: bool, drop_path: float = 0.0
) -> VisionTransformer:
    """A classifier (a `LinearProbe` with `probe`) holding `encoder`'s weights and a fresh head.

    With average pooling the encoder's final `norm` gives way to `fc_norm` over the mean token, as
    in timm and the MAE fine-tuning code. The fine-tuned `fc_norm` starts fresh (as there); the
    frozen probe's takes the pretrained `norm`'s weights, so its features stay those of the encoder.
    """
    names = {f.name for f in fields(ViTConfig)}
    values = {k: v for k, v in encoder.config.to_dict().items() if k in names}
    config = ViTConfig(
        **{**values, "num_classes": num_classes, "global_pool": global_pool, "drop_path_rate": drop_path}
    )
    classifier = (LinearProbe if probe else VisionTransformer)(config).to(encoder.cls_token.device)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    if probe and global_pool == "avg" and "norm.weight" in state and "fc_norm.weight" not in state:
        state["fc_norm.weight"], state["fc_norm.bias"] = state["norm.weight"], state["norm.bias"]
    expected = classifier.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(("head.", "norm.", "fc_norm."))]
    if missing:
        raise ValueError(f"the encoder lacks weights the classifier needs: {missing[:6]}")
    classifier.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return classifier


def exported(model: VisionTransformer) -> VisionTransformer:
    """The model to save: a linear probe's BatchNorm is folded into a plain linear head."""
    return model.to_classifier() if isinstance(model, LinearProbe) else model


# ------------------------------------------------------------------------------------------------
# Data


class Transformed(Dataset):
    """`(transform(image), label)` of a dataset of `(image, label)` or None (unreadable)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (self.transform(item[0]), item[1])


class Features(Dataset):
    """Cached features `[N, D]` and labels `[N]` as items `(feature [D], label)`."""

    draws_random = False  # `SeededDataset` reads items without seeding the RNGs

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index], self.labels[index]


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
    return v2.Compose([v2.ToPILImage(), timm_transform])


def train_dataset(cfg: ClassifyConfig, img_size, in_chans: int) -> Dataset:
    """The training images with the protocol's augmentation (none for a probe on cached features)."""
    if isinstance(cfg, FinetuneConfig):
        raw = build_dataset(cfg.data, "train", img_size, in_chans, raw=True)
        return Transformed(raw, finetune_transform(cfg, img_size, in_chans))
    augment = isinstance(cfg, LinprobeConfig) and cfg.augment
    return build_dataset(cfg.data, "train", img_size, in_chans, train_transform=augment)


def random_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """`size` items drawn without replacement (all of them when `size` is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def num_classes_of(dataset: Dataset) -> int:
    while not hasattr(dataset, "num_classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    count = getattr(dataset, "num_classes", 0)
    if count <= 0:
        raise ValueError(
            "the training images have no labels (class sub-folders): set num_classes and use labelled data"
        )
    return count


# ------------------------------------------------------------------------------------------------
# Runs


def linprobe(cfg: LinprobeConfig) -> ClassifyResult:
    """Train a linear probe on a frozen encoder as `cfg` says; returns the weights and accuracies."""
    return _train(cfg, probe=True)


def finetune(cfg: FinetuneConfig) -> ClassifyResult:
    """Fine-tune an encoder (all of it, or its last blocks) as `cfg` says."""
    return _train(cfg, probe=False)


@dataclass
class _Run:
    """What a run is made of once its input has been checked."""

    model: VisionTransformer
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    resume_from: Path | None


def _prepare(cfg: ClassifyConfig, probe: bool, dist: DistInfo) -> _Run:
    """Model and data of a run; every input error is a `UsageError`, raised before anything is written."""
    try:
        if cfg.fsdp and dist.enabled:
            raise ValueError("linear probing and fine-tuning run with DDP; set fsdp=false")
        check_precision(cfg.precision, dist.device)
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.checkpoint, cfg.model, cfg.num_heads, cfg.img_size).to(dist.device)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        train_set = train_dataset(cfg, img_size, in_chans)
        val_set = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
        if val_set is None:
            raise ValueError("validation images are needed (data.val_path for folders)")
        num_classes = cfg.num_classes or num_classes_of(train_set)
        model = build_classifier(encoder, num_classes, cfg.global_pool, probe, getattr(cfg, "drop_path", 0.0))
        if getattr(cfg, "trainable_blocks", None) is not None:
            train_only_last_blocks(model, cfg.trainable_blocks)
        if cfg.train_fraction is not None:  # the labelled share, before any train_images cut
            train_set = balanced_subset(train_set, cfg.train_fraction, seed=cfg.seed)
        return _Run(
            model,
            random_subset(train_set, cfg.train_images, cfg.seed),
            random_subset(val_set, cfg.val_images, cfg.seed),
            num_classes,
            resolve_resume(cfg.resume, cfg.output_dir),
        )
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error


def _task(cfg: ClassifyConfig, num_classes: int) -> ClassifyTask:
    """Fine-tuning: mixup / cutmix and label smoothing as configured; probing: cross-entropy."""
    if not isinstance(cfg, FinetuneConfig):
        return ClassifyTask(torch.nn.CrossEntropyLoss())
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, num_classes)
    return ClassifyTask(build_criterion(mixup, cfg.smoothing), mixup)


def _optimizer(cfg: ClassifyConfig, model: VisionTransformer, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.name == "lars":  # with the probe's trust-ratio rules, which timm's defaults miss
        return build_lars(model, lr, cfg.optim.weight_decay, cfg.optim.momentum)
    return build_optimizer(model, cfg.optim, lr)


def _train(cfg: ClassifyConfig, probe: bool) -> ClassifyResult:
    dist = init_distributed(cfg.device)
    run = _prepare(cfg, probe, dist)
    model, train_set = run.model, run.train_set
    out_dir, num_workers = Path(cfg.output_dir), cfg.data.resolved_num_workers()
    # Every rank scores its own shard of the validation images; `classification_metrics` sums over ranks.
    val_shard = ShardedEvalSampler(len(run.val_set))
    val_loader = build_loader(run.val_set, cfg.eval_batch_size, num_workers=num_workers, sampler=val_shard)
    if probe and not cfg.augment:
        # The encoder is frozen and the images fixed: encode them once, train the head on the features.
        train_set, val_loader = cache_features(model, train_set, val_loader, cfg, dist.device)
        num_workers = 0
    effective_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else absolute_lr(cfg.optim.base_lr, effective_batch)
    kind = "linprobe" if probe else "finetune"
    logger = RunLogger(out_dir, enabled=dist.is_main)
    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{kind}: {trained:,} trainable parameters, {run.num_classes} classes; effective batch "
            f"{effective_batch} -> lr {peak_lr:.3g} (base lr {cfg.optim.base_lr:g} x {effective_batch} / 256)"
        )
    metadata = {"run_config": json.dumps(config_to_dict(cfg)), "task": kind}
    best: dict = {"top1": -1.0}
    last_metrics: dict = {}
    best_path = out_dir / "best.safetensors"

    def on_epoch_end(epoch: int) -> dict:
        """Validation every `eval_every` epochs and after the last; rank 0 keeps the best weights.

        Every rank evaluates, at the same epochs (the evaluation is collective): each its shard of
        the images, with the unwrapped model, whose weights DDP keeps identical on every rank.
        """
        if not ((epoch + 1) % cfg.eval_every == 0 or trainer.finished):
            return {}
        last_metrics.clear()
        last_metrics.update(
            classification_metrics(model, val_loader, dist.device),
            epoch=epoch + 1,
            step=trainer.progress.step,
        )
        if last_metrics["top1"] > best["top1"]:
            best.update(last_metrics)
            if dist.is_main:
                extra = {"epoch": str(epoch + 1), "val_top1": f"{best['top1']:.4f}"}
                save_checkpoint(exported(model), best_path, metadata={**metadata, **extra})
        logged = {f"val_{k}": v for k, v in last_metrics.items() if k not in ("epoch", "step", "count")}
        return logged | {"best_top1": best["top1"]}

    trainer = Trainer(
        model,
        _task(cfg, run.num_classes),
        train_set,
        _optimizer(cfg, model, peak_lr),
        Schedule(peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad),
        cfg,
        dist,
        logger,
        num_workers=num_workers,
        metadata=metadata,
        on_epoch_end=on_epoch_end,
    )
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    progress = trainer.fit()
    weights = out_dir / "model.safetensors"
    if (
        last_metrics.get("step") != progress.step
    ):  # stopped after the last evaluation: score the final weights
        last_metrics.clear()
        metrics = classification_metrics(model, val_loader, dist.device)
        last_metrics.update(metrics, epoch=progress.epoch, step=progress.step)
    if dist.is_main:
        save_checkpoint(exported(model), weights, metadata=metadata)
        print(
            f"{kind}: val top-1 {last_metrics['top1']:.2f}%, top-5 {last_metrics['top5']:.2f}% "
            f"(best top-1 {best['top1']:.2f}% at epoch {best.get('epoch')}); weights: {weights}"
        )
        (out_dir / "results.json").write_text(json.dumps({"final": last_metrics, "best": best}, indent=2))
    logger.close()
    return ClassifyResult(out_dir, weights, best_path, dict(last_metrics), dict(best), progress)


def cache_features(
    model: VisionTransformer,
    train_set: Dataset,
    val_loader: DataLoader,
    cfg: ClassifyConfig,
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


__all__ = [
    "ClassifyResult",
    "FinetuneConfig",
    "LinprobeConfig",
    "build_classifier",
    "build_encoder",
    "finetune",
    "linprobe",
]
