"""Value tests of the losses against naive per-sample references and exact cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from care.errors import CareError
from care.losses import care_loss, equivariance_loss, info_nce, info_nce_terms


def _sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """Loop over the 2N anchors: -log(exp(s_pos/τ) / Σ_{k≠i} exp(s_ik/τ))."""
    z = torch.cat([z1, z2]).tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {k: sum(a * b for a, b in zip(z[i], z[k], strict=True)) / tau for k in range(2 * n)}
        denominator = sum(math.exp(s) for k, s in sims.items() if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


def naive_equi(z1: torch.Tensor, z2: torch.Tensor, m: int) -> float:
    """Loop over groups and pairs: mean_g (2/m) Σ_{i≠j} (<z_i,z_j> - <z'_i,z'_j>)²."""
    groups = len(z1) // m
    total = 0.0
    for g in range(groups):
        s = 0.0
        for i in range(m):
            for j in range(m):
                if i != j:
                    a = float(z1[g * m + i] @ z1[g * m + j])
                    b = float(z2[g * m + i] @ z2[g * m + j])
                    s += (a - b) ** 2
        total += 2.0 / m * s
    return total / groups


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_info_nce_matches_naive_reference(tau: float) -> None:
    z1, z2 = _sphere(6, 5, 1), _sphere(6, 5, 2)
    assert info_nce(z1, z2, tau).item() == pytest.approx(naive_nt_xent(z1, z2, tau), rel=1e-9)


def test_info_nce_matches_cross_entropy_form() -> None:
    z1, z2 = _sphere(8, 16, 3), _sphere(8, 16, 4)
    z = torch.cat([z1, z2])
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(8, 16), torch.arange(8)])
    expected = functional.cross_entropy(logits, target)
    assert info_nce(z1, z2, 0.2).item() == pytest.approx(expected.item(), rel=1e-9)


def test_inv_and_unif_sum_to_info_nce_and_match_their_definitions() -> None:
    z1, z2 = _sphere(10, 8, 5), _sphere(10, 8, 6)
    terms = info_nce_terms(z1, z2, 0.5)
    assert (terms.inv + terms.unif).item() == pytest.approx(info_nce(z1, z2, 0.5).item(), rel=1e-12)
    positives = (z1 * z2).sum(1) / 0.5
    assert terms.inv.item() == pytest.approx(-positives.mean().item(), rel=1e-12)


def test_info_nce_is_lower_for_aligned_views() -> None:
    z = _sphere(16, 8, 7)
    assert info_nce(z, z, 0.5) < info_nce(z, _sphere(16, 8, 8), 0.5)


def test_info_nce_with_candidates_equals_plain_when_candidates_are_the_batch() -> None:
    z1, z2 = _sphere(6, 4, 9), _sphere(6, 4, 10)
    local = info_nce_terms(z1[2:4], z2[2:4], 0.3, candidates1=z1, candidates2=z2, offset=2)
    # anchors 2,3 of each view against all 12 candidates: compare with the naive loss per anchor
    z = torch.cat([z1, z2])
    logits = z @ z.T / 0.3
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    per_anchor = functional.cross_entropy(logits, target, reduction="none")
    expected = per_anchor[[2, 3, 8, 9]].mean()
    assert local.total.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_equivariance_loss_matches_naive_reference(m: int) -> None:
    z1, z2 = _sphere(16, 6, 11), _sphere(16, 6, 12)
    assert equivariance_loss(z1, z2, m).item() == pytest.approx(naive_equi(z1, z2, m), rel=1e-9)


def test_equivariance_loss_is_zero_for_one_orthogonal_map_per_group() -> None:
    m, groups, d = 4, 5, 8
    z1 = _sphere(m * groups, d, 13)
    rotated = [z1[g * m : (g + 1) * m] @ _orthogonal(d, 100 + g).T for g in range(groups)]
    z2 = torch.cat(rotated)
    assert equivariance_loss(z1, z2, m).item() == pytest.approx(0.0, abs=1e-12)


def test_equivariance_loss_is_positive_when_a_group_is_not_orthogonally_mapped() -> None:
    m, d = 4, 8
    z1 = _sphere(2 * m, d, 14)
    z2 = torch.cat([z1[:m] @ _orthogonal(d, 1).T, _sphere(m, d, 15)])
    assert equivariance_loss(z1, z2, m).item() > 1e-3


def test_equivariance_loss_is_not_zero_for_orthogonal_maps_that_cross_groups() -> None:
    # one orthogonal map for the whole batch is zero; a different map per image is not
    z1 = _sphere(8, 6, 16)
    z2 = torch.stack([z1[i] @ _orthogonal(6, 200 + i).T for i in range(8)])
    assert equivariance_loss(z1, z2, 4).item() > 1e-3


def test_equivariance_loss_rejects_batches_that_groups_do_not_divide() -> None:
    z = _sphere(10, 4, 17)
    with pytest.raises(CareError, match="group_size=4"):
        equivariance_loss(z, z, 4)


def test_care_loss_combines_terms() -> None:
    z1, z2, e1, e2 = (_sphere(8, 4, s) for s in (20, 21, 22, 23))
    expected = info_nce(z1, z2, 0.5) + 0.3 * equivariance_loss(e1, e2, 4)
    got = care_loss(z1, z2, e1, e2, temperature=0.5, weight=0.3, group_size=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_losses_have_finite_gradients() -> None:
    z1 = _sphere(8, 4, 24).requires_grad_()
    z2 = _sphere(8, 4, 25).requires_grad_()
    (info_nce(z1, z2, 0.1) + equivariance_loss(z1, z2, 4)).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert z2.grad is not None and torch.isfinite(z2.grad).all()
