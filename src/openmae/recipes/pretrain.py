"""MAE pretraining: `openmae.pretrain(config)` and `mae pretrain`.

Defaults follow the paper's recipe (AdamW betas 0.9/0.95, weight decay 0.05, base lr 1.5e-4 per 256
images, 40 warm-up epochs then cosine, 800 epochs, random-resized crops, normalised-pixel target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from openmae.data import DataConfig, build_dataset, build_feed, build_loader, dataset_mean_std
from openmae.data.wrappers import UserImages
from openmae.engine.evaluate import reconstruction_error
from openmae.engine.loop import Hook, Progress, Schedule, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import PretrainTask
from openmae.logging import RunLogger
from openmae.models import MaskedAutoencoder, create_model
from openmae.recipes.knn import KnnMonitor
from openmae.recipes.runs import checked, join_run, open_run, resume_point


@dataclass
class PretrainConfig(TrainConfig):
    model: str = field(default="mae_vit_base_patch16", metadata={"help": "named model size (mae models)"})
    img_size: int | tuple[int, int] | None = field(
        default=None, metadata={"help": "image side, or height,width (None: the model's)"}
    )
    in_chans: int | None = field(default=None, metadata={"help": "input channels (None: the model's)"})
    mask_ratio: float | None = field(
        default=None, metadata={"help": "share of patches hidden from the encoder (None: the model's, 0.75)"}
    )
    mask_sampling: str | None = field(
        default=None, metadata={"help": "random | block | grid (None: the model's, random)"}
    )
    norm_pix_loss: bool | None = field(
        default=None, metadata={"help": "predict per-patch normalised pixels (None: the model's, true)"}
    )
    eval_images: int = field(default=512, metadata={"help": "held-out images for reconstruction error"})
    vis_every: int = field(
        default=5, metadata={"help": "epochs between held-out evaluation + images (0: off)"}
    )
    knn_every: int = field(
        default=0, metadata={"help": "epochs between k-NN accuracy checks on labelled data (0: off)"}
    )
    knn_images: int = field(
        default=5000, metadata={"help": "k-NN memory-bank images (and at most as many queries)"}
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = field(
        default="runs/pretrain", metadata={"help": "folder for checkpoints, logs and config"}
    )


@dataclass
class PretrainResult:
    output_dir: Path
    weights: Path
    progress: Progress
    eval_metrics: dict
    stopped_by_signal: bool = False


def build_pretrain_model(cfg: PretrainConfig) -> MaskedAutoencoder:
    """The named model with the fields the config sets (None leaves the model's own)."""
    fields = ("img_size", "in_chans", "mask_ratio", "mask_sampling", "norm_pix_loss")
    return create_model(cfg.model, **{f: getattr(cfg, f) for f in fields if getattr(cfg, f) is not None})


class ReconstructionMonitor(Hook):
    """Masked-patch reconstruction error on held-out images, and their pictures, every `every` epochs.

    A monitor on a small fixed set, run whole by rank 0 alone (by every rank when the model is
    sharded, as each forward needs them all; rank 0 logs): its masks are drawn in one fixed order,
    so the value is the same at any world size. The k-NN monitor, which can be large, is sharded
    instead (see `KnnMonitor`).
    """

    def __init__(self, loader: DataLoader, every: int, mean, std, seed: int, logger: RunLogger) -> None:
        self.loader, self.every, self.mean, self.std, self.seed = loader, every, mean, std, seed
        self.logger = logger
        self.last: dict = {}

    def after_epoch(self, trainer: Trainer, epoch: int) -> dict:
        due = (epoch + 1) % self.every == 0 or trainer.finished
        if not due or not (trainer.dist.is_main or trainer.sharded):
            return {}
        self.last = reconstruction_error(trainer.model, self.loader, trainer.device, seed=self.seed)
        log_reconstructions(self.logger, trainer.model, self.loader, self.mean, self.std, epoch)
        return dict(self.last)


class KnnHook(Hook):
    """`KnnMonitor` at epoch ends: every rank encodes its shard, the hits are summed."""

    def __init__(self, monitor: KnnMonitor) -> None:
        self.monitor = monitor

    def after_epoch(self, trainer: Trainer, epoch: int) -> dict:
        return self.monitor(trainer.model, epoch, trainer.finished, trainer.device)


def pretrain(cfg: PretrainConfig, dataset: Dataset | None = None) -> PretrainResult:
    """Run MAE pretraining as `cfg` says; returns where the weights went and the final metrics.

    `dataset` replaces `cfg.data`'s training images: any `torch.utils.data.Dataset` of images
    `[C, H, W]` (already transformed to the model's size) or `(image, label)` pairs.
    """
    dist = join_run(cfg)
    # Everything that can be wrong with the input is checked before anything is written.
    with checked():
        torch.manual_seed(cfg.seed)
        model = build_pretrain_model(cfg)
        img_size, in_chans = model.config.img_size, model.config.in_chans
        user_images = None if dataset is None else UserImages(dataset, in_chans, model.config.img_size)
        # Map-style or streamed (shards read in order, split over ranks and workers), with views.
        train_data = build_feed(
            cfg.data, img_size, in_chans, cfg.batch_size, cfg.accum_iter, cfg.seed,
            device=dist.device, dataset=user_images,
        )  # fmt: skip
        heldout = heldout_loader(cfg, img_size, in_chans)
        knn_monitor = KnnMonitor.from_config(cfg, img_size, in_chans)
        if knn_monitor is not None and cfg.fsdp:
            # FSDP gathers a sharded model's weights in `forward`; the k-NN features come from another method.
            raise ValueError("knn_every does not work with fsdp")
        mean, std = dataset_mean_std(cfg.data, in_chans)
    resume_from = resume_point(cfg)

    model.to(dist.device)
    target = "norm_pix" if model.config.norm_pix_loss else "pixels"
    run = open_run(cfg, cfg.optim, dist, "pretrain", target=target)
    hooks: list[Hook] = []
    if heldout is not None and cfg.vis_every:
        hooks.append(ReconstructionMonitor(heldout, cfg.vis_every, mean, std, cfg.seed, run.logger))
    if knn_monitor is not None:
        hooks.append(KnnHook(knn_monitor))
    trainer = Trainer(
        model,
        PretrainTask(model.grid_size, model.config.mask_ratio, model.config.mask_sampling),
        train_data,
        build_optimizer(model, cfg.optim, run.peak_lr),
        Schedule(run.peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad),
        cfg,
        dist,
        run.logger,
        metadata=run.metadata,
        hooks=hooks,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
        trainer.say(
            f"resumed from {resume_from} at step {trainer.progress.step} (epoch {trainer.progress.epoch})"
        )
    progress = trainer.fit()
    weights = run.out_dir / "model.safetensors"
    trainer.save_weights(weights)  # every rank: FSDP gathers the shards; rank 0 writes
    run.logger.close()
    eval_metrics = dict(hooks[0].last) if hooks and isinstance(hooks[0], ReconstructionMonitor) else {}
    return PretrainResult(run.out_dir, weights, progress, eval_metrics, trainer.stopped_by_signal)


def heldout_loader(cfg: PretrainConfig, img_size, in_chans: int) -> DataLoader | None:
    """A fixed set of validation images (eval transform) for reconstruction error and pictures."""
    if cfg.eval_images <= 0:
        return None
    dataset = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
    if dataset is None:
        return None
    dataset = Subset(dataset, range(min(cfg.eval_images, len(dataset))))
    return build_loader(dataset, batch_size=min(256, cfg.eval_images), shuffle=False, num_workers=0)


def log_reconstructions(logger: RunLogger, model, loader: DataLoader, mean, std, epoch: int) -> None:
    """A Figure-2 style grid of the first held-out images, to TensorBoard and as a PNG."""
    from openmae import viz

    imgs = next(iter(loader))[0][:8].to(next(model.parameters()).device)
    # One forward on every rank that calls this (all of them when the model is sharded), then rank 0 writes.
    grid = viz.reconstruction_grid(model, imgs, mean, std, seed=0)
    logger.image("reconstructions", viz.image_to_tensor(grid), epoch + 1)
    if logger.enabled:
        grid.save(logger.out_dir / f"reconstructions-epoch{epoch + 1:04d}.png", format="PNG")


__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
