"""Choosing which patches the encoder sees.

Every sampler ends in the same place: a per-sample ranking of the L patches whose first K
entries are kept. Random masking ranks by uniform noise (the paper's default); block and grid
masking (the paper's Table 1 ablations) and user-supplied masks rank visible patches first.
Convention: `mask` is `[B, L]` with 1 = removed (hidden from the encoder, predicted).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

import torch

MaskSampling = Literal["random", "block", "grid"]
MASK_SAMPLINGS: tuple[str, ...] = get_args(MaskSampling)


@dataclass(frozen=True)
class Masking:
    """Which patches are kept and how to undo the shuffle.

    Attributes:
        ids_keep: `[B, K]` indices of the visible patches, in shuffled order.
        ids_hidden: `[B, L-K]` indices of the hidden patches, in shuffled order.
        ids_restore: `[B, L]` indices that put a shuffled sequence back in grid order.
        mask: `[B, L]` float, 1 = removed, 0 = kept, in grid order.
    """

    ids_keep: torch.Tensor
    ids_hidden: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), as in the reference code; at least one patch must stay visible."""
    check_mask_ratio(mask_ratio)
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} hides all {num_patches} patches (at least one must stay visible): "
            f"use at most {1 - 1 / num_patches:.4g}"
        )
    return keep


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def masking_from_ranking(ranking: torch.Tensor, keep: int) -> Masking:
    """Keep the `keep` patches that come first in `ranking` (`[B, L]`, a permutation per row)."""
    B, L = ranking.shape
    ids_restore = torch.argsort(ranking, dim=1)  # [B, L]
    mask = torch.ones(B, L, device=ranking.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to grid order
    return Masking(
        ids_keep=ranking[:, :keep], ids_hidden=ranking[:, keep:], ids_restore=ids_restore, mask=mask
    )


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """Per-sample random masking: ascending argsort of `noise` (`[B, L]`), keep the first K."""
    keep = num_kept(noise.shape[1], mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, L], small noise is kept
    return masking_from_ranking(ids_shuffle, keep)


def masking_from_mask(mask: torch.Tensor) -> Masking:
    """Masking for a given `[B, L]` mask (1 = removed); every row must keep the same count."""
    mask = mask.float()
    kept_per_row = (mask == 0).sum(dim=1)
    if kept_per_row.numel() and not bool((kept_per_row == kept_per_row[0]).all()):
        raise ValueError(
            f"every row of a mask must keep the same number of patches, got {kept_per_row.tolist()}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("a mask may hold only 0 (kept) and 1 (removed)")
    keep = int(kept_per_row[0]) if kept_per_row.numel() else 0
    ranking = torch.argsort(mask, dim=1, stable=True)  # kept (0) first, grid order within each
    return masking_from_ranking(ranking, keep)


def grid_mask(grid_size: tuple[int, int], mask_ratio: float, device=None) -> torch.Tensor:
    """Regular grid sampling: keep one patch of every s x s cell, s = sqrt(1 / (1 - ratio)).

    Only ratios of the form 1 - 1/s^2 (0, 0.75, 0.889, ...) are regular; others are an error.
    Returns `[h*w]` with 1 = removed.
    """
    check_mask_ratio(mask_ratio)
    stride = round(1 / math.sqrt(1 - mask_ratio))
    if abs((1 - 1 / stride**2) - mask_ratio) > 1e-6:
        raise ValueError(f"grid masking needs mask_ratio = 1 - 1/s^2 (e.g. 0.75), got {mask_ratio}")
    h, w = grid_size
    rows = torch.arange(h, device=device)[:, None] % stride == 0
    cols = torch.arange(w, device=device)[None, :] % stride == 0
    return (~(rows & cols)).float().reshape(-1)


def block_mask(
    grid_size: tuple[int, int],
    mask_ratio: float,
    generator: random.Random,
    min_block: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Block-wise sampling (BEiT style): remove random rectangles until K patches are hidden.

    The last block is trimmed at random so that exactly `L - K` patches are removed.
    Returns `[h*w]` with 1 = removed.
    """
    h, w = grid_size
    L = h * w
    to_remove = L - num_kept(L, mask_ratio)
    mask = torch.zeros(h, w)
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    while int(mask.sum()) < to_remove:
        missing = to_remove - int(mask.sum())
        area = generator.uniform(min(min_block, missing), max(min_block, missing))
        aspect = math.exp(generator.uniform(log_lo, log_hi))
        bh = max(1, min(h, round(math.sqrt(area * aspect))))
        bw = max(1, min(w, round(math.sqrt(area / aspect))))
        top, left = generator.randint(0, h - bh), generator.randint(0, w - bw)
        block = torch.zeros(h, w, dtype=torch.bool)
        block[top : top + bh, left : left + bw] = True
        new = (block & (mask == 0)).nonzero()
        excess = int(mask.sum()) + len(new) - to_remove
        if excess > 0:
            order = torch.tensor(generator.sample(range(len(new)), len(new) - excess), dtype=torch.long)
            new = new[order]
        mask[new[:, 0], new[:, 1]] = 1
    return mask.reshape(-1)


def sample_masking(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    sampling: MaskSampling = "random",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Draw a masking for a batch with one of the paper's samplers.

    `generator` makes the draw reproducible (it also seeds block sampling).
    """
    L = grid_size[0] * grid_size[1]
    if sampling == "random":
        noise = torch.rand(batch_size, L, device=device, generator=generator)
        return random_masking(noise, mask_ratio)
    if sampling == "grid":
        mask = grid_mask(grid_size, mask_ratio, device=device).expand(batch_size, L)
        return masking_from_mask(mask)
    if sampling == "block":
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        rng = random.Random(seed)
        mask = torch.stack([block_mask(grid_size, mask_ratio, rng) for _ in range(batch_size)])
        return masking_from_mask(mask.to(device))
    raise ValueError(f"unknown mask sampling {sampling!r}; choose one of {MASK_SAMPLINGS}")
