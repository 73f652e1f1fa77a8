"""MAE pretraining: `openmae.pretrain(config)` and `mae pretrain`.

Defaults follow the paper's recipe (AdamW betas 0.9/0.95, weight decay 0.05, base lr 1.5e-4 per 256
images, 40 warm-up epochs then cosine, 800 epochs, random-resized crops, normalised-pixel target).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from openmae.config import config_to_dict, save_config
from openmae.data import DataConfig, build_dataset, build_loader, dataset_mean_std
from openmae.distributed import init_distributed
from openmae.engine.checkpoint import resolve_resume
from openmae.engine.evaluate import reconstruction_error
from openmae.engine.loop import Progress, Schedule, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.precision import check_precision
from openmae.engine.sampler import noise_from_seeds
from openmae.engine.schedule import absolute_lr
from openmae.errors import UsageError
from openmae.logging import RunLogger
from openmae.models import MaskedAutoencoder, create_model
from openmae.recipes.knn import KnnMonitor


@dataclass
class PretrainConfig(TrainConfig):
    model: str = field(default="mae_vit_base_patch16", metadata={"help": "named model size (mae models)"})
    img_size: int | None = field(default=None, metadata={"help": "image side (None: the model's)"})
    in_chans: int | None = field(default=None, metadata={"help": "input channels (None: the model's)"})
    mask_ratio: float = field(default=0.75, metadata={"help": "share of patches hidden from the encoder"})
    mask_sampling: str = field(default="random", metadata={"help": "random | block | grid"})
    norm_pix_loss: bool = field(default=True, metadata={"help": "predict per-patch normalised pixels"})
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


class PretrainTask:
    """The batch loss: masking noise comes from each sample's seed, so it replays on resume."""

    def __init__(self, num_patches: int, per_sample_noise: bool) -> None:
        self.num_patches = num_patches
        self.per_sample_noise = per_sample_noise

    def __call__(self, model, batch, device):
        images, _, seeds = batch
        noise = noise_from_seeds(seeds, self.num_patches, device) if self.per_sample_noise else None
        out = model(images.to(device, non_blocking=True), noise=noise)
        return out.loss, {}


def build_pretrain_model(cfg: PretrainConfig) -> MaskedAutoencoder:
    return create_model(cfg.model, **model_overrides(cfg))


def model_overrides(cfg: PretrainConfig) -> dict:
    """The fields of the named model's config that `cfg` sets."""
    overrides = {
        "mask_ratio": cfg.mask_ratio,
        "norm_pix_loss": cfg.norm_pix_loss,
        "mask_sampling": cfg.mask_sampling,
    }
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    if cfg.in_chans is not None:
        overrides["in_chans"] = cfg.in_chans
    for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "encoder_mask_tokens"):
        if getattr(cfg, name) is not None:  # None keeps the named model's value
            overrides[name] = getattr(cfg, name)
    return overrides


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run MAE pretraining as `cfg` says; returns where the weights went and the final metrics."""
    dist = init_distributed(cfg.device)
    # Everything that can be wrong with the input is checked before anything is written.
    try:
        torch.manual_seed(cfg.seed)
        model = build_pretrain_model(cfg)
        img_size, in_chans = model.config.img_size, model.config.in_chans
        train_set = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=True)
        heldout = heldout_loader(cfg, img_size, in_chans)
        knn_monitor = KnnMonitor.from_config(cfg, img_size, in_chans)
        if knn_monitor is not None and cfg.fsdp:
            # FSDP gathers a sharded model's weights in `forward`; the k-NN features come from another method.
            raise ValueError("knn_every does not work with fsdp")
        resume_from = resolve_resume(cfg.resume, cfg.output_dir)
        check_precision(cfg.precision, dist.device)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error

    model.to(dist.device)
    effective_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else absolute_lr(cfg.optim.base_lr, effective_batch)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    out_dir = Path(cfg.output_dir)
    logger = RunLogger(out_dir, enabled=dist.is_main)
    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
        rule = f"base lr {cfg.optim.base_lr:g} x {effective_batch} / 256"
        print(f"effective batch {effective_batch} -> lr {peak_lr:.3g} ({rule})")
    metadata = {
        "run_config": json.dumps(config_to_dict(cfg)),
        "target": "norm_pix" if cfg.norm_pix_loss else "pixels",
    }
    mean, std = dataset_mean_std(cfg.data, in_chans)
    eval_metrics: dict = {}

    def on_epoch_end(epoch: int) -> dict:
        """Reconstruction error on the held-out images, and their pictures, every `vis_every` epochs.

        A monitor on a small fixed set, run whole by rank 0 alone (by every rank when the model is
        sharded, as each forward needs them all; rank 0 logs): its masks are drawn in one fixed
        order, so the value is the same at any world size. The k-NN monitor, which can be large,
        is sharded instead (see `KnnMonitor`).
        """
        last = trainer.finished
        if (
            heldout is None
            or not (dist.is_main or trainer.sharded)  # a sharded model needs every rank in its forward
            or not cfg.vis_every
            or not ((epoch + 1) % cfg.vis_every == 0 or last)
        ):
            return {}
        eval_metrics.update(reconstruction_error(model, heldout, dist.device, seed=cfg.seed))
        log_reconstructions(logger, model, heldout, mean, std, epoch)
        return dict(eval_metrics)

    def on_epoch_end_with_knn(epoch: int) -> dict:
        metrics = on_epoch_end(epoch)
        if knn_monitor is not None:  # every rank: each encodes its shard, the hits are summed
            metrics |= knn_monitor(model, epoch, trainer.finished, dist.device)
        return metrics

    trainer = Trainer(
        model,
        PretrainTask(model.num_patches, per_sample_noise=cfg.mask_sampling == "random"),
        train_set,
        optimizer,
        Schedule(peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad),
        cfg,
        dist,
        logger,
        num_workers=cfg.data.resolved_num_workers(),
        metadata=metadata,
        on_epoch_end=on_epoch_end_with_knn,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
        if dist.is_main:
            print(
                f"resumed from {resume_from} at step {trainer.progress.step} (epoch {trainer.progress.epoch})"
            )
    progress = trainer.fit()
    weights = out_dir / "model.safetensors"
    trainer.save_weights(weights)  # every rank: FSDP gathers the shards; rank 0 writes
    logger.close()
    return PretrainResult(out_dir, weights, progress, eval_metrics)


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
