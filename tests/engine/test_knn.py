"""Weighted k-NN on features, and the top-k accuracy it reports."""

import math

import pytest
import torch

from openmae.engine.evaluate import topk_accuracy
from openmae.engine.knn import knn_scores


def clustered(num_classes, per_class, dim, generator, spread=0.05):
    """Points around one random direction per class: separable by cosine similarity."""
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_perfectly_separable_features_give_100_percent():
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = clustered(5, 40, 16, g)
    queries, labels = clustered(5, 10, 16, torch.Generator().manual_seed(0))
    scores = knn_scores(bank, bank_labels, queries + 0.01, num_classes=5, k=20, chunk=7)
    assert topk_accuracy(scores, labels)["top1"] == 100.0
    # ...and labels shuffled against the features drop it to chance level.
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=g)]
    chance = topk_accuracy(knn_scores(bank, shuffled, queries, num_classes=5), labels)["top1"]
    assert chance < 60.0


def test_votes_are_temperature_weighted_sums_over_the_k_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(bank, bank_labels, query, num_classes=2, k=3, temperature=0.5)
    q = query[0] / query[0].norm()
    cos = [float(q @ (b / b.norm())) for b in bank]  # the 4th (opposite) is not among the 3 nearest
    expected = torch.tensor([[math.exp(cos[0] / 0.5), math.exp(cos[1] / 0.5) + math.exp(cos[2] / 0.5)]])
    torch.testing.assert_close(scores, expected)


def test_k_larger_than_the_bank_uses_the_whole_bank():
    bank, labels = torch.eye(3), torch.tensor([0, 1, 2])
    scores = knn_scores(bank, labels, torch.eye(3), num_classes=3, k=20)
    assert scores.argmax(1).tolist() == [0, 1, 2]


def test_topk_accuracy_counts_a_label_anywhere_in_the_top_k():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    accuracy = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert accuracy["top1"] == pytest.approx(100 / 3)
    assert accuracy["top2"] == pytest.approx(200 / 3)
    assert accuracy["top5"] == 100.0
