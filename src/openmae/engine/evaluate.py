"""Held-out measurements shared by the recipes."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

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
