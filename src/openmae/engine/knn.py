"""Weighted k-nearest-neighbour classification on frozen features: a cheap monitor of an encoder.

The protocol of Wu et al. (2018), as DINO uses it: features are L2-normalised, each query takes its
k most cosine-similar training features, and each neighbour votes for its label with weight
`exp(similarity / T)`. No training, so it can run every few epochs of pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from openmae.distributed import all_gather_cat, all_reduce_sum
from openmae.engine.evaluate import topk_hits
from openmae.engine.features import extract_features
from openmae.models.vit import GlobalPool, VisionTransformer


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
    bank_loader: DataLoader,
    query_loader: DataLoader,
    device: torch.device,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    pool: GlobalPool | None = "token",
) -> dict[str, float]:
    """k-NN top-1 / top-5 (percent) of `query_loader`'s images against a bank of `bank_loader`'s features.

    Under torchrun every rank calls this, each with loaders over its own shards of the two sets
    (`ShardedEvalSampler`; `contiguous=True` for the bank keeps it in dataset order, so ties among
    neighbours break as in one process). The bank's shards are gathered to every rank, each rank
    scores its own queries, and the hits are summed over the ranks: each query is counted once.
    """
    bank, bank_labels = extract_features(model, bank_loader, device, pool, desc="k-NN bank")
    bank, bank_labels = all_gather_cat(bank, via=device), all_gather_cat(bank_labels, via=device)
    if bank.shape[0] == 0:
        raise ValueError("no images in the k-NN memory bank")
    queries, labels = extract_features(model, query_loader, device, pool, desc="k-NN queries")
    hits = torch.zeros(2, dtype=torch.float64)  # top-1, top-5
    if len(labels):  # a rank's shard of the queries may be empty; it still takes part in the sum
        hits = topk_hits(knn_scores(bank, bank_labels, queries, num_classes, k, temperature), labels)
    top1, top5, count = all_reduce_sum(torch.cat([hits, torch.tensor([len(labels)])]), via=device).tolist()
    if count == 0:
        raise ValueError("no k-NN query images")
    return {"knn_top1": 100.0 * top1 / count, "knn_top5": 100.0 * top5 / count}
