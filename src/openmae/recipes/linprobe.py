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
from openmae.engine.classify import LARS_TRUST_COEFF, build_lars
from openmae.engine.features import extract_features
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import ClassifyTask
from openmae.models.vit import GlobalPool, VisionTransformer
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

# ImageNet-1k's training images: the dataset the paper's linear-probe lr was set for.
IMAGENET_TRAIN_IMAGES = 1_281_167
# The largest share of its norm one step may move the probe's matrix by (the paper's step, at batch
# 16384 and lr 6.4, is 0.0064): a larger factor on small data makes the probe diverge or thrash.
MAX_LARS_STEP = 0.01


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
    lars_reference_images: int = field(
        default=IMAGENET_TRAIN_IMAGES,
        metadata={
            "help": "LARS: the head's weight matrix trains at this / training images x the lr (when "
            "more than 1), so an epoch moves it as far as an epoch of the paper's ImageNet-1k (0: off)"
        },
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
        encoder = load_classify_encoder(cfg, dist)
        img_size, in_chans = encoder.config.img_size, encoder.config.in_chans
        train_set = None
        if dataset is None:
            train_set = build_dataset(cfg.data, "train", img_size, in_chans, train_transform=cfg.augment)
        data = labelled_data(cfg, train_set, img_size, in_chans, dataset)
        # BatchNorm in training mode needs two images to normalise by.
        cfg = fitted_batch(cfg, len(data.train_set), dist, "linprobe", minimum=2)
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
    peak_lr = cfg.optim.peak_lr(cfg.batch_size * cfg.accum_iter * dist.world_size)[0]
    matrix_scale = lars_matrix_scale(cfg, len(data.train_set), peak_lr)
    if matrix_scale != 1.0 and dist.is_main:
        print(
            f"linprobe: LARS: the head's weight matrix trains at {matrix_scale:,.0f} x the lr below "
            f"({cfg.lars_reference_images:,} ImageNet images / {len(data.train_set):,} training images: "
            f"an epoch moves it as far as one of the paper's, {MAX_LARS_STEP:.0%} of its norm a step at "
            "most; lars_reference_images=0 turns it off)",
            flush=True,
        )
    return fit_classifier(
        cfg,
        dist,
        "linprobe",
        model,
        train_data,
        validation,
        ClassifyTask(torch.nn.CrossEntropyLoss()),
        lambda model, lr: probe_optimizer(cfg.optim, model, lr, matrix_scale),
        resume_from,
        num_workers,
    )


def lars_matrix_scale(cfg: LinprobeConfig, train_images: int, peak_lr: float) -> float:
    """The factor on the lr of LARS' trust-ratio steps (the head's weight matrix) for a training set
    smaller than ImageNet-1k: ImageNet's size over the dataset's (1 when off, or for larger sets),
    capped so that no step moves the matrix by more than `MAX_LARS_STEP` of its norm.

    A trust-ratio step moves the matrix by a fixed share of its norm (lr x trust coefficient), so the
    batch rule (lr proportional to the batch, steps per epoch inversely so) moves it by the same
    amount per epoch at any batch size, but that amount shrinks with the dataset: the paper's
    0.1 x batch / 256 on 48 images moves the head 26,690 times less per epoch than on ImageNet, and a
    30-epoch probe stayed below chance. The factor gives each epoch the paper's movement. The bias
    keeps the rule's lr: its plain steps do not shrink with the dataset, and 26,690 times larger
    they throw the logits around by tens a step. The cap matters on the smallest sets: 600 images
    (Fashion-MNIST's 1%) at lr 2 asked for steps of 4.3x the matrix's norm, and the probe diverged
    to NaN; such a set then needs more epochs, not larger steps.
    """
    if cfg.optim.name != "lars" or cfg.lars_reference_images <= 0 or cfg.optim.lr is not None:
        return 1.0
    largest = MAX_LARS_STEP / (peak_lr * LARS_TRUST_COEFF)
    return max(1.0, min(cfg.lars_reference_images / train_images, largest))


def probe_optimizer(
    optim: OptimConfig, model: VisionTransformer, lr: float, matrix_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    if optim.name == "lars":  # with the probe's trust-ratio rules, which timm's defaults miss
        return build_lars(model, lr, optim.weight_decay, optim.momentum, matrix_lr_scale)
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
