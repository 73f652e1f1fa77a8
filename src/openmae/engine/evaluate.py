"""Held-out measurements shared by the recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from openmae.distributed import all_reduce_sum
from openmae.models.mae import MaskedAutoencoder
from openmae.models.patches import patchify


@torch.no_grad()
def reconstruction_error(
    model: MaskedAutoencoder,
    loader: DataLoader,
    device: torch.device,
    mask_ratio: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Masked-patch MSE of the model, next to a trivial baseline, in the model's input space.

    The baseline predicts every hidden pixel as the mean of the visible pixels of its image (per
    channel). Masks are drawn from `seed`, so two evaluations see the same masks. With a
    normalised-pixel model both are scored against normalised patches instead (the baseline then
    predicts 0, the mean of a normalised patch).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64)  # model error, baseline error, hidden patches
    for batch in loader:
        imgs = batch[0].to(device)
        noise = torch.rand(imgs.shape[0], model.num_patches, generator=generator).to(device)
        out = model(imgs, mask_ratio=mask_ratio, noise=noise)
        target = model.reconstruction_target(imgs)  # [B, L, P*P*C]
        baseline = baseline_prediction(patchify(imgs, model.patch_size), out.mask, imgs.shape[1])
        if model.config.norm_pix_loss:
            baseline = torch.zeros_like(baseline)
        hidden = out.mask.sum()
        sums += torch.stack([
            model.forward_loss(out.pred, target, out.mask) * hidden,
            model.forward_loss(baseline, target, out.mask) * hidden,
            hidden,
        ]).double().cpu()  # fmt: skip
    model.train(was_training)
    count = max(float(sums[2]), 1.0)
    return {"masked_mse": float(sums[0]) / count, "baseline_mse": float(sums[1]) / count}


def baseline_prediction(patches: torch.Tensor, mask: torch.Tensor, channels: int) -> torch.Tensor:
    """Each patch predicted as the per-channel mean of its image's visible pixels.

    `patches`: `[B, L, P*P*C]` pixels (channel fastest); `mask`: `[B, L]`, 1 = hidden.
    """
    B, L, D = patches.shape
    pixels = patches.reshape(B, L, D // channels, channels)  # [B, L, P*P, C]
    visible = (1 - mask)[:, :, None, None]  # [B, L, 1, 1]
    visible_pixels = (visible.sum(dim=(1, 2)) * (D // channels)).clamp(min=1)  # [B, 1]
    mean = (pixels * visible).sum(dim=(1, 2)) / visible_pixels  # [B, C]
    return mean[:, None, None, :].expand(B, L, D // channels, channels).reshape(B, L, D)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows of `scores` `[N, classes]` have their label among the `k` highest, per `k` in `ks`.

    Returns counts `[len(ks)]` (float64, on the CPU): sums that add up over batches and ranks.
    A `k` of at least the number of classes counts every row.
    """
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, kmax]
    hits = ranked == labels[:, None]  # [N, kmax]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).double().cpu()


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Percent of rows of `scores` `[N, classes]` whose label is among the `k` highest, per `k` in `ks`.

    Returns `{"top1": ..., "top5": ...}`; a `k` of at least the number of classes counts every row.
    """
    hits = topk_hits(scores, labels, ks)
    return {f"top{k}": 100.0 * float(n) / max(len(labels), 1) for k, n in zip(ks, hits, strict=True)}


@torch.no_grad()
def classification_metrics(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (percent) of a classifier, and the images it scored.

    `loader` yields `(inputs, labels, ...)`; the model is evaluated in eval mode, then put back.
    Under torchrun every rank must call this, each with a loader over its own shard of the images
    (`ShardedEvalSampler`): losses, hits and counts are summed over the ranks, so every rank gets
    the metrics of the whole set, each image counted once. Returns `{"loss", "top1", "top5", "count"}`.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, images
    for batch in loader:
        inputs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if inputs.numel() == 0:
            continue
        logits = model(inputs).float()  # [B, classes]
        loss = F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        sums += torch.cat([loss[None], topk_hits(logits, labels), torch.tensor([len(labels)])])
    model.train(was_training)
    # A rank whose shard is empty still takes part; the error, if any, is then the same on every rank.
    loss_sum, top1, top5, count = all_reduce_sum(sums, via=device).tolist()
    if count == 0:
        raise ValueError("no labelled images to evaluate")
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "count": int(count),
    }
