"""Bilinear forms, the hyperboloid and random group elements (care.geometry; paper, Sec. 3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from care.errors import CareError
from care.geometry import (
    apply_form,
    bilinear,
    form_matrix,
    lift_to_hyperboloid,
    lorentz_distance,
    lorentz_similarity,
    minkowski_inner,
    random_lorentz,
    random_symplectic,
    soft_clip,
    squared_lorentz_distance,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_form_matrices() -> None:
    assert torch.equal(form_matrix("euclidean", 3), torch.eye(3, dtype=torch.float64))
    assert torch.equal(
        form_matrix("minkowski", 3), torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    )
    J = form_matrix("symplectic", 4)
    expected = torch.tensor(
        [[0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0], [0, -1, 0, 0]], dtype=torch.float64
    )
    assert torch.equal(J, expected)
    assert torch.equal(J @ J, -torch.eye(4, dtype=torch.float64))
    user = torch.randn(3, 3, generator=_gen(0))
    assert torch.equal(form_matrix(user, 3, dtype=torch.float32), user)


@pytest.mark.parametrize("form", ["euclidean", "minkowski", "symplectic", "user"])
def test_apply_form_equals_multiplying_by_the_matrix(form: str) -> None:
    d = 6
    J = torch.randn(d, d, generator=_gen(1), dtype=torch.float64)
    named: str | torch.Tensor = J if form == "user" else form
    x = torch.randn(3, 5, d, generator=_gen(2), dtype=torch.float64)  # batched rows
    expected = x @ form_matrix(named, d)
    assert torch.allclose(apply_form(x, named), expected, atol=1e-14)
    y = torch.randn(4, d, generator=_gen(3), dtype=torch.float64)
    assert torch.allclose(bilinear(x[0], y, named), x[0] @ form_matrix(named, d) @ y.T)


def test_bad_forms_are_one_line_care_errors() -> None:
    with pytest.raises(CareError, match="even embedding size, got 5") as info:
        form_matrix("symplectic", 5)
    assert "\n" not in str(info.value) and "head_out" in str(info.value)
    with pytest.raises(CareError, match="unknown bilinear form"):
        form_matrix("spherical", 4)
    with pytest.raises(CareError, match=r"\(4, 4\)"):
        form_matrix(torch.eye(3), 4)


@pytest.mark.parametrize("curvature", [0.1, 1.0, 2.5, 10.0])
def test_lift_puts_points_on_the_hyperboloid(curvature: float) -> None:
    u = torch.randn(32, 7, generator=_gen(4), dtype=torch.float64) * 3.0
    x = lift_to_hyperboloid(u, curvature)
    assert x.shape == (32, 8)
    assert torch.allclose(
        minkowski_inner(x, x), torch.full((32,), -1.0 / curvature, dtype=torch.float64), rtol=1e-12
    )
    assert (x[:, 0] > 0).all() and torch.equal(x[:, 1:], u)
    apex = lift_to_hyperboloid(torch.zeros(1, 7, dtype=torch.float64), curvature)
    assert apex[0, 0].item() == pytest.approx(1.0 / math.sqrt(curvature))
    # float32 stays on the hyperboloid too (relative to the size of the coordinates)
    x32 = lift_to_hyperboloid(u.float(), curvature)
    scale = x32[:, 0].square()
    err = (minkowski_inner(x32, x32) + 1.0 / curvature).abs() / scale
    assert err.max().item() < 1e-5


def test_soft_clip_bounds_norms_and_is_the_identity_near_zero() -> None:
    u = torch.randn(64, 5, generator=_gen(5), dtype=torch.float64) * 1e3
    clipped = soft_clip(u, 1.0)
    assert (clipped.norm(dim=1) < 1.0).all()
    small = torch.randn(4, 5, generator=_gen(6), dtype=torch.float64) * 1e-6
    assert torch.allclose(soft_clip(small, 1.0), small, rtol=1e-11)
    # saturated: |clip(u)| ≈ r for |u| ≫ r
    assert torch.allclose(soft_clip(u, 2.0).norm(dim=1) / 2.0, clipped.norm(dim=1), rtol=1e-4)
    with pytest.raises(CareError, match="radius"):
        soft_clip(u, 0.0)


def test_lorentz_distances_agree() -> None:
    c = 2.0
    x = lift_to_hyperboloid(torch.randn(10, 4, generator=_gen(7), dtype=torch.float64), c)
    y = lift_to_hyperboloid(torch.randn(10, 4, generator=_gen(8), dtype=torch.float64), c)
    rho = lorentz_distance(x, y, c)
    d2 = squared_lorentz_distance(x, y, c)
    # d_L² = (2/c)(cosh(√c ρ) - 1), and the pairwise similarity is -d_L²/2
    assert torch.allclose(d2, 2.0 / c * (torch.cosh(math.sqrt(c) * rho) - 1.0), rtol=1e-10)
    assert torch.allclose(torch.diagonal(lorentz_similarity(x, y, c)), -d2 / 2, atol=1e-12)
    assert torch.allclose(
        lorentz_distance(x, x, c), torch.zeros(10, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(
        squared_lorentz_distance(x, x, c), torch.zeros(10, dtype=torch.float64), atol=1e-12
    )
    # the squared distance is bounded by the spatial parts' Euclidean squared distance
    assert (d2 <= (x[:, 1:] - y[:, 1:]).square().sum(1) + 1e-12).all()


@pytest.mark.parametrize("d", [2, 3, 9])
def test_random_lorentz_is_a_proper_orthochronous_lorentz_map(d: int) -> None:
    J = form_matrix("minkowski", d)
    for seed in range(5):
        L = random_lorentz(d, _gen(seed), max_rapidity=2.0)
        assert torch.allclose(L.T @ J @ L, J, atol=1e-12)
        assert torch.linalg.det(L).item() == pytest.approx(1.0, abs=1e-10)
        assert L[0, 0].item() >= 1.0
    # it maps the hyperboloid onto itself (upper sheet) and keeps geodesic distances
    x = lift_to_hyperboloid(torch.randn(6, d - 1, generator=_gen(9), dtype=torch.float64))
    L = random_lorentz(d, _gen(10), max_rapidity=2.0)
    y = x @ L.T
    assert torch.allclose(minkowski_inner(y, y), -torch.ones(6, dtype=torch.float64), atol=1e-10)
    assert (y[:, 0] > 0).all()
    assert torch.allclose(lorentz_distance(x, x.roll(1, 0)), lorentz_distance(y, y.roll(1, 0)))


@pytest.mark.parametrize("d", [2, 4, 8])
def test_random_symplectic_preserves_the_form(d: int) -> None:
    J = form_matrix("symplectic", d)
    for seed in range(3):
        S = random_symplectic(d, _gen(seed), scale=1.0)
        assert torch.allclose(S.T @ J @ S, J, atol=1e-12)
        assert torch.linalg.det(S).item() == pytest.approx(1.0, abs=1e-9)
        assert not torch.allclose(S.T @ S, torch.eye(d, dtype=torch.float64), atol=1e-3)
    with pytest.raises(CareError, match="even"):
        random_symplectic(3)
