"""Frozen-encoder features: one pooled vector per image, for k-NN and the linear probe's cache."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from openmae.distributed import is_main_process
from openmae.models.vit import GlobalPool, VisionTransformer


@torch.no_grad()
def extract_features(
    model: VisionTransformer,
    loader: DataLoader,
    device: torch.device,
    pool: GlobalPool | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features `[N, D]` (float32, on the CPU) and labels `[N]` of every image `loader` yields.

    `pool` is `model.pool`'s: None for the model's own pooling.

    `loader` yields `(images, labels, ...)`; batches with no readable image are skipped, and a loader
    with none at all (e.g. a rank's empty shard) gives `[0, D]` and `[0]`: callers decide whether
    that is an error, once the shards of every rank are in. The model is put in eval mode for the
    pass and then back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    features, labels = [], []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process())
    for batch in bar:
        images, targets = batch[0], batch[1]
        if images.numel() == 0:
            continue
        tokens = model.forward_features(images.to(device, non_blocking=True))  # [B, 1+L, D]
        features.append(model.pool(tokens, pool).float().cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    if not features:
        return torch.zeros(0, model.config.embed_dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)
