"""What linear probing and fine-tuning share: their config, the classifier built on a pretrained
encoder, the labelled data, and the run around the one `Trainer` with validation at epoch ends.

The two protocols (`recipes.linprobe`, `recipes.finetune`) differ in five decisions, each a default of
their config:

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import to_2tuple
from torch.utils.data import DataLoader, Dataset

from openmae.checkpoint import read_metadata, read_weights, save_checkpoint
from openmae.data import DataConfig, build_dataset, build_loader
from openmae.data.probe import probe_images
from openmae.data.subsets import balanced_subset
from openmae.data.wrappers import UserImages, num_classes_of, random_subset
from openmae.distributed import DistInfo, ShardedEvalSampler
from openmae.engine.evaluate import classification_metrics
from openmae.engine.loop import Hook, Progress, Schedule, Task, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig
from openmae.interop import load_encoder, load_state_into
from openmae.models.probe import LinearProbe
from openmae.models.vit import GlobalPool, VisionTransformer
from openmae.recipes.runs import LossCurve, checked, open_run, stop_signal


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
    img_size: int | tuple[int, int] | None = field(
        default=None, metadata={"help": "image side, or height,width (None: the checkpoint's)"}
    )
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
class ClassifyResult:
    output_dir: Path
    weights: Path
    best_weights: Path
    metrics: dict  # validation metrics of the final weights
    best: dict  # the best validation metrics seen, with their epoch
    progress: Progress
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run early
    ema_weights: Path | None = None  # the weight average's, with `ema_decay`
    ema_metrics: dict = field(default_factory=dict)  # its validation metrics

    @property
    def stopped_by_signal(self) -> bool:
        return self.stop_signal is not None


# ------------------------------------------------------------------------------------------------
# Models


def build_classifier(
    encoder: VisionTransformer, num_classes: int, global_pool: GlobalPool, probe: bool, drop_path: float = 0.0
) -> VisionTransformer:
    """A classifier (a `LinearProbe` with `probe`) holding `encoder`'s weights and a fresh head.

    With average pooling the encoder's final `norm` gives way to `fc_norm` over the mean token, as
    in timm and the MAE fine-tuning code. The fine-tuned `fc_norm` starts fresh (as there); the
    frozen probe's takes the pretrained `norm`'s weights, so its features stay those of the encoder.
    """
    config = encoder.config.encoder_config(
        num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path
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


@dataclass
class LabelledData:
    train_set: Dataset
    val_set: Dataset
    num_classes: int


def labelled_data(
    cfg: ClassifyConfig, train_set: Dataset, img_size, in_chans: int, dataset: Dataset | None = None
) -> LabelledData:
    """The training images (`dataset`, a user's own, replaces `train_set`), the validation images,
    and the class count, each cut to the configured subset size."""
    if dataset is not None:
        train_set = UserImages(dataset, in_chans, tuple(img_size))
    val_set = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
    if val_set is None:
        raise ValueError("validation images are needed (data.val_path for folders)")
    num_classes = cfg.num_classes or num_classes_of(train_set)
    if cfg.train_fraction is not None:  # the labelled share, class-balanced, before any train_images cut
        train_set = balanced_subset(train_set, cfg.train_fraction, seed=cfg.seed)
    data = LabelledData(
        random_subset(train_set, cfg.train_images, cfg.seed),
        random_subset(val_set, cfg.val_images, cfg.seed),
        num_classes,
    )
    shape = (in_chans, *to_2tuple(img_size))
    probe_images(data.train_set, shape, "training images", seed=cfg.seed)
    probe_images(data.val_set, shape, "validation images", seed=cfg.seed)
    return data


def val_loader(cfg: ClassifyConfig, val_set: Dataset) -> DataLoader:
    """Every rank scores its own shard of the validation images; `classification_metrics` sums them."""
    shard = ShardedEvalSampler(len(val_set))
    return build_loader(
        val_set, cfg.eval_batch_size, num_workers=cfg.data.resolved_num_workers(), sampler=shard
    )


def load_classify_encoder(cfg: ClassifyConfig, dist: DistInfo) -> VisionTransformer:
    """The encoder a classifier is built on, on this rank's device, after the run's own checks; the
    seed is set for the new head. Call inside `checked()`: errors are the input's."""
    if cfg.fsdp and dist.enabled:
        raise ValueError("linear probing and fine-tuning run with DDP; set fsdp=false")
    if cfg.data.views != 1 or cfg.data.decoder == "gpu":
        raise ValueError("data.views and data.decoder=gpu are pretraining options (mae pretrain)")
    torch.manual_seed(cfg.seed)
    return load_encoder(cfg.checkpoint, cfg.model, cfg.num_heads, cfg.img_size).to(dist.device)


# ------------------------------------------------------------------------------------------------
# The run


class Validation(Hook):
    """Validation every `eval_every` epochs and after the last; rank 0 keeps the best weights.

    Every rank evaluates, at the same epochs (the evaluation is collective): each its shard of the
    images, with the unwrapped model, whose weights DDP keeps identical on every rank.
    """

    def __init__(self, loader: DataLoader, every: int, best_path: Path, metadata: dict[str, str]) -> None:
        self.loader, self.every, self.best_path, self.metadata = loader, every, best_path, metadata
        self.best: dict = {"top1": -1.0}
        self.last: dict = {}

    def after_epoch(self, trainer: Trainer, epoch: int) -> dict:
        if not ((epoch + 1) % self.every == 0 or trainer.finished):
            return {}
        self.score(trainer, epoch + 1)
        if self.last["top1"] > self.best["top1"]:
            self.best = dict(self.last)
            if trainer.dist.is_main:
                extra = {"epoch": str(epoch + 1), "val_top1": f"{self.best['top1']:.4f}"}
                save_checkpoint(exported(trainer.model), self.best_path, metadata={**self.metadata, **extra})
        logged = {f"val_{k}": v for k, v in self.last.items() if k not in ("epoch", "step", "count")}
        return logged | {"best_top1": self.best["top1"]}

    def after_fit(self, trainer: Trainer) -> None:
        """A run stopped after its last evaluation (a signal, `max_steps`) scores its final weights."""
        if self.last.get("step") != trainer.progress.step:
            self.score(trainer, trainer.progress.epoch)

    def score(self, trainer: Trainer, epoch: int) -> None:
        metrics = classification_metrics(trainer.model, self.loader, trainer.device)
        self.last = {**metrics, "epoch": epoch, "step": trainer.progress.step}


def fit_classifier(
    cfg: ClassifyConfig,
    dist: DistInfo,
    kind: str,
    model: VisionTransformer,
    train_data: Dataset,
    validation_loader: DataLoader,
    task: Task,
    build_optimizer,
    resume_from: Path | None,
    num_workers: int,
    ema_decay: float | None = None,
) -> ClassifyResult:
    """Train `model` on `train_data` with `task`, validating as configured; save and report.

    `build_optimizer(model, lr)` makes the optimizer once the run's lr is known. With `ema_decay`, an
    exponential moving average of the weights is kept, validated alongside, and saved as
    `ema.safetensors`.
    """
    run = open_run(cfg, cfg.optim, dist, kind)
    if dist.is_main:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{kind}: {trained:,} trainable parameters, {model.config.num_classes} classes", flush=True)
    validation = Validation(validation_loader, cfg.eval_every, run.out_dir / "best.safetensors", run.metadata)
    hooks: list[Hook] = [validation]
    ema = None
    if ema_decay is not None:
        ema = WeightAverage(model, ema_decay, validation, run.out_dir / "ema.safetensors", run.metadata)
        hooks.append(ema)
    hooks.append(LossCurve(run.out_dir))
    trainer = Trainer(
        model,
        task,
        train_data,
        build_optimizer(model, run.peak_lr),
        Schedule(run.peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad),
        cfg,
        dist,
        run.logger,
        num_workers=num_workers,
        metadata=run.metadata,
        hooks=hooks,
    )
    if resume_from is not None:
        with checked():
            trainer.resume(resume_from)
        if ema is not None:
            ema.resume(trainer)
    progress = trainer.fit()
    weights = run.out_dir / "model.safetensors"
    final, best = validation.last, validation.best
    ema_metrics = dict(ema.last) if ema is not None else {}
    if dist.is_main:
        save_checkpoint(exported(model), weights, metadata=run.metadata)
        averaged = f"; weight average top-1 {ema_metrics['top1']:.2f}%" if ema_metrics else ""
        print(
            f"{kind}: val top-1 {final['top1']:.2f}%, top-5 {final['top5']:.2f}% "
            f"(best top-1 {best['top1']:.2f}% at epoch {best.get('epoch')}){averaged}; weights: {weights}"
        )
        results = {"final": final, "best": best} | ({"ema": ema_metrics} if ema_metrics else {})
        (run.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    run.logger.close()
    return ClassifyResult(
        run.out_dir,
        weights,
        validation.best_path,
        dict(final),
        dict(best),
        progress,
        stop_signal(trainer),
        ema.path if ema is not None else None,
        ema_metrics,
    )


class WeightAverage(Hook):
    """An exponential moving average of the weights (timm's `ModelEmaV3`), updated after every step,
    validated whenever `validation` is, and saved as `path` when the run ends (finished or stopped).

    The average is not part of the run checkpoints: a run resumed at the step `path` was written
    (a stop by a signal) continues it; one resumed elsewhere (after a crash) starts it again from
    the resumed weights, and says so.
    """

    def __init__(
        self, model: VisionTransformer, decay: float, validation: Validation, path: Path, metadata: dict
    ) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay)
        self.validation, self.path, self.metadata = validation, path, metadata
        self.last: dict = {}

    def resume(self, trainer: Trainer) -> None:
        step = trainer.progress.step
        saved = read_metadata(self.path).get("step") if self.path.is_file() else None
        if saved == str(step):
            load_state_into(self.ema.module, read_weights(self.path).state)
        else:
            trainer.say(
                f"weight average: none saved at step {step}; it starts again from the resumed weights"
            )
            self.ema.set(trainer.model)

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update(trainer.model, step=trainer.progress.step)

    def after_epoch(self, trainer: Trainer, epoch: int) -> dict:
        if self.validation.last.get("step") != trainer.progress.step:  # validation skipped this epoch
            return {}
        self.last = classification_metrics(self.ema.module, self.validation.loader, trainer.device)
        return {f"ema_{k}": v for k, v in self.last.items() if k != "count"}

    def after_fit(self, trainer: Trainer) -> None:
        if not self.last or self.validation.last.get("step") != trainer.progress.step:
            self.last = classification_metrics(self.ema.module, self.validation.loader, trainer.device)
        if trainer.dist.is_main:
            metadata = {**self.metadata, "step": str(trainer.progress.step), "ema_decay": str(self.ema.decay)}
            save_checkpoint(exported(self.ema.module), self.path, metadata=metadata)


__all__ = ["ClassifyConfig", "ClassifyResult", "build_classifier", "fit_classifier"]
