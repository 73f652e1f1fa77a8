"""MAE pretraining: `openmae.pretrain(config)` and `mae pretrain`.

Defaults follow the paper's recipe (AdamW betas 0.9/0.95, weight decay 0.05, base lr 1.5e-4 per 256
images, 40 warm-up epochs then cosine, 800 epochs, random-resized crops, normalised-pixel target), with
one change for runs smaller than the paper's: its lr (at a batch of 4096) is scaled to other batch
sizes by the square root of the ratio rather than linearly (`optim.lr_scaling`), so a batch of 64
trains at 3e-4, not 3.75e-5; the shipped paper configs keep the linear rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from openmae.data import (
    DataConfig,
    build_dataset,
    build_feed,
    build_loader,
    dataset_mean_std,
    training_images,
)
from openmae.data.feed import TrainFeed
from openmae.data.probe import probe_images
from openmae.data.wrappers import UserImages
from openmae.engine.evaluate import reconstruction_error
from openmae.engine.loop import Hook, Progress, Schedule, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import PretrainTask
from openmae.logging import RunLogger
from openmae.models import MaskedAutoencoder, create_model
from openmae.recipes.knn import KnnMonitor
from openmae.recipes.runs import (
    LossCurve,
    checked,
    fitted_batch,
    join_run,
    open_run,
    resume_point,
    stop_signal,
)


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
    decoder_embed_dim: int | None = field(
        default=None, metadata={"help": "decoder width (None: the model's)"}
    )
    decoder_depth: int | None = field(default=None, metadata={"help": "decoder blocks (None: the model's)"})
    decoder_num_heads: int | None = field(
        default=None, metadata={"help": "decoder attention heads (None: the model's)"}
    )
    encoder_mask_tokens: bool | None = field(
        default=None,
        metadata={"help": "mask tokens in the encoder: the paper's Table 1c baseline (None: the model's)"},
    )
    eval_images: int = field(default=512, metadata={"help": "held-out images for reconstruction error"})
    vis_every: int = field(
        default=5,
        metadata={
            "help": "epochs between held-out evaluation + images (0: off); without data.val_path, 5% of "
            "an image folder (at most eval_images) is held out of training for it"
        },
    )
    knn_every: int = field(
        default=0, metadata={"help": "epochs between k-NN accuracy checks on labelled data (0: off)"}
    )
    knn_images: int = field(
        default=5000, metadata={"help": "k-NN memory-bank images (and at most as many queries)"}
    )
    data: DataConfig = field(default_factory=DataConfig)
    # The paper's lr at its batch of 4096 (1.5e-4 x 4096 / 256), square-root scaled at other sizes.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr_scaling="sqrt", reference_batch=4096))
    output_dir: str = field(
        default="runs/pretrain", metadata={"help": "folder for checkpoints, logs and config"}
    )


@dataclass
class PretrainResult:
    output_dir: Path
    weights: Path
    progress: Progress
    eval_metrics: dict
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run early

    @property
    def stopped_by_signal(self) -> bool:
        return self.stop_signal is not None


def build_pretrain_model(cfg: PretrainConfig) -> MaskedAutoencoder:
    """The named model with the fields the config sets."""
    return create_model(cfg.model, **model_overrides(cfg))


# The fields of PretrainConfig that are the model's (None leaves the named model's own value).
MODEL_FIELDS = (
    "img_size", "in_chans", "mask_ratio", "mask_sampling", "norm_pix_loss",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "encoder_mask_tokens",
)  # fmt: skip


def model_overrides(cfg: PretrainConfig) -> dict:
    """The fields of the named model's config that `cfg` sets."""
    return {name: getattr(cfg, name) for name in MODEL_FIELDS if getattr(cfg, name) is not None}


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
        train_set = user_images or training_images(cfg.data, img_size, in_chans)
        train_set, heldout, heldout_note = heldout_split(
            cfg, train_set, dataset is not None, img_size, in_chans
        )
        if train_set is not None:  # map-style: a sample of it is read now, so bad files fail here
            probe_images(train_set, (in_chans, *img_size), "training images", seed=cfg.seed)
        if heldout is not None:
            probe_images(heldout, (in_chans, *img_size), "held-out images", seed=cfg.seed)
        if train_set is not None:  # a smaller batch where the images do not fill one (said in a line)
            cfg = fitted_batch(cfg, len(train_set), dist, "pretrain")
        # Map-style or streamed (shards read in order, split over ranks and workers), with views.
        train_data = build_feed(
            cfg.data, img_size, in_chans, cfg.batch_size, cfg.accum_iter, cfg.seed,
            device=dist.device, dataset=train_set,
        )  # fmt: skip
        knn_monitor = KnnMonitor.from_config(cfg, img_size, in_chans)
        if knn_monitor is not None and cfg.fsdp:
            # FSDP gathers a sharded model's weights in `forward`; the k-NN features come from another method.
            raise ValueError("knn_every does not work with fsdp")
        mean, std = dataset_mean_std(cfg.data, in_chans)
        if dist.is_main and heldout_note:
            print(f"pretrain: {heldout_note}", flush=True)
    resume_from = resume_point(cfg)

    model.to(dist.device)
    target = "norm_pix" if model.config.norm_pix_loss else "pixels"
    run = open_run(cfg, cfg.optim, dist, "pretrain", target=target)
    hooks: list[Hook] = []
    monitor = None
    if heldout is not None:
        loader = build_loader(heldout, batch_size=min(256, cfg.eval_images), shuffle=False, num_workers=0)
        monitor = ReconstructionMonitor(loader, cfg.vis_every, mean, std, cfg.seed, run.logger)
        hooks.append(monitor)
    if knn_monitor is not None:
        hooks.append(KnnHook(knn_monitor))
    hooks.append(LossCurve(run.out_dir))
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
        with checked():
            trainer.resume(resume_from)
        trainer.say(
            f"resumed from {resume_from} at step {trainer.progress.step} (epoch {trainer.progress.epoch})"
        )
    progress = trainer.fit()
    weights = run.out_dir / "model.safetensors"
    trainer.save_weights(weights)  # every rank: FSDP gathers the shards; rank 0 writes
    run.logger.close()
    eval_metrics = dict(monitor.last) if monitor is not None else {}
    return PretrainResult(run.out_dir, weights, progress, eval_metrics, stop_signal(trainer))


# Without validation images, this share of an image folder (at most `eval_images`) is held out of
# training for the reconstruction monitor.
HOLDOUT_SHARE = 0.05


def heldout_split(
    cfg: PretrainConfig, train_data, user_data: bool, img_size, in_chans: int
) -> tuple[Dataset | TrainFeed, Dataset | None, str]:
    """The training data, the fixed held-out images (eval transform) of the reconstruction monitor,
    and a line to say about them.

    The monitor runs every `vis_every` epochs on up to `eval_images` validation images. Without a
    validation split, a map-style dataset built from `cfg.data` gives a fixed random 5% of its
    images (chosen by the seed, taken out of training) instead; when nothing can be held out, the
    monitor is off, and the line says why.
    """
    if not (cfg.vis_every and cfg.eval_images > 0):
        return train_data, None, ""
    val = build_dataset(cfg.data, "val", img_size, in_chans, train_transform=False)
    if val is not None:
        return train_data, Subset(val, range(min(cfg.eval_images, len(val)))), ""
    mapped = isinstance(train_data, Dataset)
    count = min(cfg.eval_images, int(HOLDOUT_SHARE * len(train_data))) if mapped else 0
    if user_data or count < 1:
        why = (
            "a dataset passed in is not split" if user_data
            else "streamed data is not split" if not mapped
            else f"{len(train_data)} training images are too few to spare {HOLDOUT_SHARE:.0%}"
        )  # fmt: skip
        return train_data, None, f"the reconstruction monitor (vis_every) is off: no data.val_path, and {why}"
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    eval_view = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=False)
    note = (
        f"holding out {count} of the {len(train_data)} training images for the reconstruction monitor "
        "(no data.val_path); they are left out of training"
    )
    return Subset(train_data, sorted(order[count:])), Subset(eval_view, sorted(order[:count])), note


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
