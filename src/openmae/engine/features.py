"""Frozen-encoder features: one pooled vector per image, for k-NN and the linear probe's cache."""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from openmae.distributed import is_main_process
from openmae.models.vit import VisionTransformer

Pool = Literal["token", "avg"]


def pooled_features(model: VisionTransformer, imgs: torch.Tensor, pool: Pool) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, D]`: the model's own pooling when `pool` is its `global_pool`.

    Otherwise (e.g. average pooling of an MAE encoder, whose `global_pool` is "token"): the cls
    token, or the mean of the patch tokens, both after the encoder's final norm.
    """
    tokens = model.forward_features(imgs)  # [B, 1+L, D]
    if pool == model.config.global_pool:
        return model.forward_head(tokens, pre_logits=True)
    if pool == "token":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")


@torch.no_grad()
def extract_features(
    model: VisionTransformer,
    loader: DataLoader,
    device: torch.device,
    pool: Pool,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features `[N, D]` (float32, on the CPU) and labels `[N]` of every image `loader` yields.

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
        features.append(pooled_features(model, images.to(device, non_blocking=True), pool).float().cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    if not features:
        return torch.zeros(0, model.config.embed_dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)
