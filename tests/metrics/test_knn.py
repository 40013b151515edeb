"""Tests for care.metrics.knn: the weighted kNN vote on cosine similarity (Wu et al., 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from care.metrics import weighted_knn_accuracy, weighted_knn_predict


def naive_knn_predict(
    bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float
) -> list[int]:
    """One query at a time in plain Python: cosine similarity to every bank row, the ``k``
    largest, ``exp(similarity / temperature)`` summed per class, the heaviest class."""

    def unit(row: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    bank_rows = [unit(row) for row in bank.tolist()]
    bank_labels = labels.tolist()
    predicted = []
    for query in queries.tolist():
        q = unit(query)
        sims = [sum(a * b for a, b in zip(q, row, strict=True)) for row in bank_rows]
        nearest = sorted(range(len(sims)), key=lambda i: sims[i], reverse=True)[:k]
        votes: dict[int, float] = {}
        for i in nearest:
            votes[bank_labels[i]] = votes.get(bank_labels[i], 0.0) + math.exp(sims[i] / temperature)
        predicted.append(max(votes, key=lambda c: votes[c]))
    return predicted


@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_matches_naive_reference_on_random_data(k: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(1000 * k + round(100 * temperature))
    bank = torch.randn(300, 8, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = torch.randn(70, 8, generator=g)
    got = weighted_knn_predict(
        bank, labels, queries, 5, k=k, temperature=temperature, chunk_size=16
    )
    assert got.dtype == torch.long and got.shape == (70,)
    assert got.tolist() == naive_knn_predict(bank, labels, queries, k, temperature)
    whole = weighted_knn_predict(bank, labels, queries, 5, k=k, temperature=temperature)
    assert torch.equal(got, whole)  # chunking does not change the answer


# Hand-computed bank on the plane. Cosine similarities to the query (2, 0): 1 for the class-1 row,
# cos 60° = 0.5 for the two class-0 rows, 0 for the class-2 row (which k = 3 leaves out). Norms
# differ on purpose: only directions count.
BANK = torch.tensor([[3.0, 0.0], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.0, 2.0]])
LABELS = torch.tensor([1, 0, 0, 2])


def test_weighted_vote_beats_majority_vote() -> None:
    query = torch.tensor([[2.0, 0.0]])
    # τ = 0.1: class 1 gets e^10 ≈ 22026, class 0 gets 2 e^5 ≈ 297: one close neighbour outweighs
    # two farther ones, which a plain majority vote (class 0, two votes to one) gets wrong.
    assert weighted_knn_predict(BANK, LABELS, query, 3, k=3, temperature=0.1).tolist() == [1]
    # τ = 10: class 1 gets e^0.1 ≈ 1.105, class 0 gets 2 e^0.05 ≈ 2.103: the weights are nearly
    # flat and the majority wins.
    assert weighted_knn_predict(BANK, LABELS, query, 3, k=3, temperature=10.0).tolist() == [0]


def test_k_larger_than_the_bank_uses_every_row() -> None:
    # Query (0, 1): similarities 0 (class 1), ±cos 30° (class 0), 1 (class 2). The nearest row
    # alone says class 2; all four rows at τ = 10 give class 0: e^0.0866 + e^-0.0866 ≈ 2.0075
    # against e^0.1 ≈ 1.105 (class 2) and e^0 = 1 (class 1).
    query = torch.tensor([[0.0, 1.0]])
    assert weighted_knn_predict(BANK, LABELS, query, 3, k=1, temperature=10.0).tolist() == [2]
    everything = weighted_knn_predict(BANK, LABELS, query, 3, k=1000, temperature=10.0)
    assert everything.tolist() == [0]
    assert torch.equal(
        everything, weighted_knn_predict(BANK, LABELS, query, 3, k=4, temperature=10.0)
    )


def test_accuracy_on_a_known_case() -> None:
    # Default k = 200 (all four rows) and τ = 0.1. Predictions, from the similarities:
    # (1, 0) → 1 (e^10); (0, 1) → 2 (e^10 against e^8.66 for class 0); the class-0 row's own
    # direction → 0 (e^10 + e^-5 against e^8.66 and e^5); (-1, 0) → 2 (e^0 against 2 e^-5).
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, math.sqrt(0.75)], [-1.0, 0.0]])
    assert weighted_knn_predict(BANK, LABELS, queries, 3).tolist() == [1, 2, 0, 2]
    truth = torch.tensor([1, 2, 0, 0])  # the last query is misclassified
    assert weighted_knn_accuracy(BANK, LABELS, queries, truth, 3) == 0.75
    assert weighted_knn_accuracy(BANK, LABELS, queries[:3], truth[:3], 3) == 1.0
