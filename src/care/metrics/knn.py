"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each test sample votes with its ``k`` most cosine-similar training samples, weighted by
``exp(similarity / temperature)``; the class with the largest total weight wins.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional


@torch.no_grad()
def weighted_knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted labels of ``test_features`` (rows) from a labelled bank of ``train_features``."""
    bank = functional.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = functional.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def weighted_knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (in [0, 1]) of :func:`weighted_knn_predict`."""
    predicted = weighted_knn_predict(
        train_features, train_labels, test_features, num_classes, k, temperature
    )
    return (predicted.cpu() == test_labels.cpu().long()).float().mean().item()
