"""Cutting images into patches and putting them back.

Inside a patch the pixels are ordered (row, column, channel) and patches follow the grid in
row-major order, as in the MAE reference code and HuggingFace ViTMAE, so pixel targets and
predictions are interchangeable with theirs.
"""

from __future__ import annotations

import torch


def patch_grid(H: int, W: int, patch_size: int) -> tuple[int, int]:
    """`(h, w)`: patches per column and per row of an `H x W` image (both must divide)."""
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {patch_size}")
    return H // patch_size, W // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened non-overlapping patches.

    Args:
        imgs: `[B, C, H, W]`, with H and W divisible by `patch_size`.
        patch_size: side P of a square patch.

    Returns:
        `[B, L, P*P*C]` with `L = (H/P) * (W/P)`.
    """
    B, C, H, W = imgs.shape
    P = patch_size
    h, w = patch_grid(H, W, P)
    x = imgs.reshape(B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, P, P, C]
    return x.reshape(B, h * w, P * P * C)


def take_patches(imgs: torch.Tensor, patch_size: int, ids: torch.Tensor) -> torch.Tensor:
    """The patches at grid positions `ids` of each image, flattened as a stride-P convolution's
    weight is, (channel, row, column): the patch embedding's input. Only these patches are copied.

    Args:
        imgs: `[B, C, H, W]`, with H and W divisible by `patch_size`.
        patch_size: side P of a square patch.
        ids: `[B, K]` positions in the row-major grid of `(H/P) x (W/P)` patches.

    Returns:
        `[B, K, C*P*P]`.
    """
    B, C, H, W = imgs.shape
    P = patch_size
    h, w = patch_grid(H, W, P)
    grid = imgs.reshape(B, C, h, P, w, P).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, P, P], a view
    rows = torch.arange(B, device=imgs.device)[:, None]  # [B, 1]
    return grid[rows, ids // w, ids % w].reshape(B, ids.shape[1], C * P * P)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: `[B, L, P*P*C]`.
        patch_size: side P of a square patch.
        grid_size: `(h, w)` patches per column and row; `h * w` must equal L.

    Returns:
        `[B, C, h*P, w*P]`.
    """
    B, L, D = patches.shape
    h, w = grid_size
    P = patch_size
    if h * w != L or D % (P * P):
        raise ValueError(f"cannot unpatchify {tuple(patches.shape)} into a {h}x{w} grid of {P}x{P} patches")
    C = D // (P * P)
    x = patches.reshape(B, h, w, P, P, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, P, w, P]
    return x.reshape(B, C, h * P, w * P)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixel target: `(x - mean) / sqrt(var + eps)` over each patch.

    The variance is the unbiased one (torch's default), as in the reference code.
    `patches` is `[B, L, P*P*C]`; the result has the same shape.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def denormalize_patches(normed: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map normalised-pixel predictions back to pixels with the statistics of `reference`.

    Used to show reconstructions of a model trained with `norm_pix_loss`: each predicted patch
    gets the mean and variance of the corresponding patch of the original image.
    """
    mean = reference.mean(dim=-1, keepdim=True)
    var = reference.var(dim=-1, keepdim=True)
    return normed * (var + eps) ** 0.5 + mean
