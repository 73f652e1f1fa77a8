"""Learning-rate schedule: linear warm-up, then a half-cycle cosine down to a floor.

A pure function of training progress. Progress is counted in images seen (not optimizer steps), so
a run resumed under another world size or batch size continues on the same curve.
"""

from __future__ import annotations

import math

# A warm-up longer than this share of the run leaves too little of it at a useful lr; it is cut
# to the paper's share instead (40 of 800 epochs).
MAX_WARMUP_SHARE = 0.25
PAPER_WARMUP_SHARE = 0.05


def warmup_cosine_lr(
    progress: float, total: float, warmup: float, peak_lr: float, min_lr: float = 0.0
) -> float:
    """Learning rate after `progress` units of `total` (e.g. images seen), `warmup` of them warm-up.

    Warm-up rises linearly from 0 to `peak_lr`; then a half cosine falls to `min_lr` at `total`.
    """
    if warmup > 0 and progress < warmup:
        return peak_lr * progress / warmup
    span = max(total - warmup, 1e-12)
    fraction = min(max((progress - warmup) / span, 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def fitted_warmup(warmup: float, total: float) -> float:
    """`warmup`, or 5% of `total` when it would take more than a quarter of the run
    (e.g. the paper's 40 warm-up epochs in a 2-epoch run)."""
    return PAPER_WARMUP_SHARE * total if warmup > MAX_WARMUP_SHARE * total else warmup


def absolute_lr(
    base_lr: float, effective_batch: int, scaling: str = "linear", reference_batch: int = 256
) -> float:
    """The lr of a batch size, from `base_lr` per 256 images.

    `linear` is the paper's rule, lr = base_lr x effective batch / 256. `sqrt` gives the same lr at
    `reference_batch` and scales with the square root of the batch from there,
    lr = base_lr x reference_batch / 256 x sqrt(effective batch / reference_batch): the rule under
    which Adam follows the same trajectory at another batch size (Malladi et al., NeurIPS 2022), where
    the linear rule leaves a small batch with an lr too small to move in a short run.
    """
    if scaling == "linear":
        return base_lr * effective_batch / 256
    if scaling == "sqrt":
        return base_lr * reference_batch / 256 * math.sqrt(effective_batch / reference_batch)
    raise ValueError(f"lr scaling must be linear or sqrt, got {scaling!r}")
