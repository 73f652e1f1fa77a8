"""Weighted k-nearest-neighbour classification on frozen features: a cheap monitor of an encoder.

The protocol of Wu et al. (2018), as DINO uses it: features are L2-normalised, each query takes its
k most cosine-similar training features, and each neighbour votes for its label with weight
`exp(similarity / T)`. No training, so it can run every few epochs of pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from openmae.engine.evaluate import topk_accuracy
from openmae.engine.features import Pool, extract_features
from openmae.models.vit import VisionTransformer


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores `[Q, num_classes]` of `queries` `[Q, D]` from the labelled `bank` `[N, D]`, `[N]`.

    A class's score is the sum of `exp(cos / temperature)` over the query's k nearest neighbours
    of that class. Queries are processed `chunk` at a time, so memory stays `chunk x N`.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"{bank.shape[0]} bank features but {bank_labels.shape[0]} labels")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    scores = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)  # [q, D]
        similarity, index = (q @ bank.T).topk(k, dim=1)  # [q, k] each
        weights = (similarity / temperature).exp()  # [q, k]
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[index], weights))  # [q, num_classes]
    return torch.cat(scores)


def knn_accuracy(
    model: VisionTransformer,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    pool: Pool = "token",
) -> dict[str, float]:
    """k-NN top-1 / top-5 (percent) of `val_loader` against a bank of `train_loader`'s features."""
    bank, bank_labels = extract_features(model, train_loader, device, pool, desc="k-NN bank")
    queries, labels = extract_features(model, val_loader, device, pool, desc="k-NN queries")
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature)
    return {f"knn_{name}": value for name, value in topk_accuracy(scores, labels).items()}
