"""Tests for care.metrics.equivariance: Wahba's problem, γ_f, composition, linear and group fits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from care import geometry
from care.geometry import (
    form_matrix,
    lift_to_hyperboloid,
    random_lorentz,
    random_symplectic,
)
from care.metrics import (
    EquivarianceReport,
    GroupFitResult,
    WahbaResult,
    composition_error,
    equivariance_report,
    form_distortion,
    group_fit,
    linear_fit,
    relative_equivariance,
    wahba_error,
)
from care.metrics import equivariance as metrics_equivariance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """Haar-random Q ∈ SO(d) (care.geometry's generator, seeded)."""
    return geometry.random_rotation(d, _gen(seed))


def random_embeddings(
    n: int, d: int, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed), dtype=torch.float64).to(dtype)


def naive_gamma(F: torch.Tensor, F_a: torch.Tensor, eps: float = 1e-12) -> tuple[float, int, int]:
    F, F_a = F.double(), F_a.double()
    n = F.shape[0]
    total, used, degenerate = 0.0, 0, 0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            num = (float(((F_a[j] - F_a[i]) ** 2).sum()) - float(((F[j] - F[i]) ** 2).sum())) ** 2
            den = (float(((F_a[j] - F[j]) ** 2).sum()) + float(((F_a[i] - F[i]) ** 2).sum())) ** 2
            if den <= eps:
                degenerate += 1
                continue
            total += num / den
            used += 1
    return (total / used if used else 0.0), used, degenerate


# ---------------------------------------------------------------------------------------------
# Wahba's problem
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 8])
def test_exact_rotation_recovered(d: int) -> None:
    F = random_embeddings(50, d, seed=d, dtype=torch.float32)
    Q = random_rotation(d, seed=100 + d)
    F_a = (F.double() @ Q.T).float()
    for group in ("SO", "O"):
        res = wahba_error(F, F_a, group=group)
        assert isinstance(res, WahbaResult)
        assert res.group == group
        assert res.error < 1e-5  # float32 inputs
        assert res.error_per_sqrt_n == pytest.approx(res.error / math.sqrt(50))
        assert res.rotation.dtype == torch.float64
        assert torch.allclose(res.rotation, Q, atol=1e-5)
    # float64 inputs: exact to rounding
    res64 = wahba_error(F.double(), F.double() @ Q.T)
    assert res64.error < 1e-12
    assert torch.allclose(res64.rotation, Q, atol=1e-12)
    assert torch.linalg.det(res64.rotation).item() == pytest.approx(1.0)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_reflection_so_positive_o_zero(d: int) -> None:
    F = random_embeddings(40, d, seed=7)
    P = random_rotation(d, seed=8)
    P[:, 0] = -P[:, 0]  # det = -1
    F_a = F @ P.T
    so = wahba_error(F, F_a, "SO")
    o = wahba_error(F, F_a, "O")
    assert o.error < 1e-10
    assert torch.allclose(o.rotation, P, atol=1e-10)
    assert so.error > 0.1
    assert torch.linalg.det(so.rotation).item() == pytest.approx(1.0)
    assert torch.linalg.det(o.rotation).item() == pytest.approx(-1.0)


@pytest.mark.parametrize(("n", "d", "seed"), [(30, 4, 0), (100, 16, 1), (10, 12, 2), (64, 3, 3)])
def test_o_group_matches_scipy_procrustes(n: int, d: int, seed: int) -> None:
    F = random_embeddings(n, d, seed)
    F_a = random_embeddings(n, d, seed + 1000) + 0.5 * F
    omega, _ = orthogonal_procrustes(F.numpy(), F_a.numpy())  # min ||F Ω - F_a||, Ω = Rᵀ
    ref = float(np.linalg.norm(F.numpy() @ omega - F_a.numpy()))
    res = wahba_error(F, F_a, "O")
    assert res.error == pytest.approx(ref, abs=1e-8)
    if n >= d:  # unique optimum
        assert np.allclose(res.rotation.numpy(), omega.T, atol=1e-8)


def test_so2_matches_brute_force_angle_scan() -> None:
    for seed in range(2):
        F = random_embeddings(25, 2, seed)
        F_a = F @ random_rotation(2, seed + 50).T + 0.7 * random_embeddings(25, 2, seed + 99)
        theta = torch.linspace(0.0, 2 * math.pi, 200_001, dtype=torch.float64)
        c, s = torch.cos(theta), torch.sin(theta)
        # rows: f_a ≈ R f with R = [[c, -s], [s, c]]
        x, y = F[:, 0], F[:, 1]
        px = c[:, None] * x[None] - s[:, None] * y[None]
        py = s[:, None] * x[None] + c[:, None] * y[None]
        err = ((px - F_a[:, 0]) ** 2 + (py - F_a[:, 1]) ** 2).sum(dim=1).sqrt()
        brute = float(err.min())
        res = wahba_error(F, F_a, "SO")
        assert res.error <= brute + 1e-12
        assert res.error == pytest.approx(brute, abs=1e-7)


def test_error_grows_with_noise() -> None:
    F = random_embeddings(200, 8, seed=11)
    Q = random_rotation(8, seed=12)
    N = random_embeddings(200, 8, seed=13)
    errs = [wahba_error(F, F @ Q.T + s * N).error_per_sqrt_n for s in (0.0, 0.01, 0.1, 0.5, 1.0)]
    assert errs[0] < 1e-12
    assert all(a < b for a, b in itertools.pairwise(errs))


def test_unknown_group_and_bad_shapes_raise() -> None:
    F = random_embeddings(10, 3, 0)
    with pytest.raises(ValueError, match="group"):
        wahba_error(F, F, group="GL")
    with pytest.raises(ValueError, match="shape"):
        wahba_error(F, F[:5])
    with pytest.raises(ValueError, match="2-D"):
        wahba_error(F[0], F[0])
    with pytest.raises(ValueError, match="NaN"):
        wahba_error(F, torch.full_like(F, float("nan")))


# ---------------------------------------------------------------------------------------------
# Linear fit and ordering of the residuals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "seed"), [(50, 4, 0), (20, 10, 1), (8, 12, 2), (300, 32, 3)])
def test_linear_le_o_le_so(n: int, d: int, seed: int) -> None:
    F = random_embeddings(n, d, seed)
    F_a = torch.tanh(random_embeddings(n, d, seed + 7) + F)
    rep = equivariance_report(F, F_a)
    assert rep.linear_residual <= rep.wahba_o + 1e-10
    assert rep.wahba_o <= rep.wahba_so + 1e-10
    assert rep.wahba_so <= rep.invariance_distance + 1e-10  # R = I is admissible
    assert 0.0 <= rep.wahba_so_ratio <= 1.0 + 1e-10


def test_linear_fit_exact_for_non_orthogonal_map() -> None:
    F = random_embeddings(100, 6, seed=21)
    A = torch.randn(6, 6, generator=_gen(22), dtype=torch.float64) + 2 * torch.eye(6)
    F_a = F @ A.T
    M, res = linear_fit(F, F_a)
    assert res < 1e-10
    assert torch.allclose(M, A, atol=1e-10)
    rep = equivariance_report(F, F_a)
    assert rep.linear_residual < 1e-10
    assert rep.wahba_o > 0.1


def test_linear_fit_rank_deficient() -> None:
    # Embeddings in a 3-dim subspace of R^6: M is not unique, but the fit must be exact and finite.
    basis = random_embeddings(3, 6, seed=31)
    F = random_embeddings(40, 3, seed=32) @ basis
    A = torch.randn(6, 6, generator=_gen(33), dtype=torch.float64)
    M, res = linear_fit(F.float(), (F @ A.T).float())
    assert torch.isfinite(M).all()
    assert res < 1e-5


# ---------------------------------------------------------------------------------------------
# Relative equivariance γ_f
# ---------------------------------------------------------------------------------------------


def test_gamma_zero_for_orthogonal_action() -> None:
    F = random_embeddings(60, 5, seed=41)
    Q = random_rotation(5, seed=42)
    gamma, used, degenerate = relative_equivariance(F, F @ Q.T)
    assert gamma < 1e-20
    assert used == 60 * 59
    assert degenerate == 0


def test_gamma_positive_for_non_orthogonal_map() -> None:
    F = random_embeddings(60, 5, seed=43)
    A = torch.diag(torch.tensor([2.0, 1.0, 0.5, 1.0, 1.0], dtype=torch.float64))
    gamma, used, _ = relative_equivariance(F, F @ A.T)
    assert gamma > 0.01
    assert used == 60 * 59


def test_gamma_matches_naive_double_loop() -> None:
    F = random_embeddings(12, 4, seed=51, dtype=torch.float32)
    F_a = F + 0.3 * random_embeddings(12, 4, seed=52, dtype=torch.float32)
    ref = naive_gamma(F, F_a)
    got = relative_equivariance(F, F_a)
    assert got[1:] == ref[1:]
    assert got[0] == pytest.approx(ref[0], rel=1e-9)
    # chunked evaluation gives the same answer
    for block in (1, 5, 100):
        chunked = relative_equivariance(F, F_a, block_rows=block)
        assert chunked[1:] == ref[1:]
        assert chunked[0] == pytest.approx(ref[0], rel=1e-9)


def test_gamma_degenerate_pairs_counted() -> None:
    F = random_embeddings(10, 3, seed=61)
    F_a = F + 0.2 * random_embeddings(10, 3, seed=62)
    F_a[:3] = F[:3]  # rows 0..2 invariant: pairs among them have zero denominator
    gamma, used, degenerate = relative_equivariance(F, F_a)
    assert degenerate == 3 * 2
    assert used == 10 * 9 - 6
    assert math.isfinite(gamma)
    assert (gamma, used, degenerate) == pytest.approx(naive_gamma(F, F_a))
    # every pair degenerate
    assert relative_equivariance(F, F) == (0.0, 0, 90)
    # fewer than two rows
    assert relative_equivariance(F[:1], F_a[:1]) == (0.0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Composition (Corollary 1)
# ---------------------------------------------------------------------------------------------


def test_composition_error_for_group_action() -> None:
    d = 6
    F = random_embeddings(200, d, seed=71)
    R_a, R_b = random_rotation(d, 72), random_rotation(d, 73)
    F_a, F_b, F_ba = F @ R_a.T, F @ R_b.T, F @ (R_b @ R_a).T
    out = composition_error(F, F_a, F_b, F_ba)
    assert set(out) == {"composition_error", "wahba_composed", "wahba_chain"}
    assert all(v < 1e-10 for v in out.values())
    # b∘a is not a ∘ b: the wrong order is detected
    wrong = composition_error(F, F_a, F_b, F @ (R_a @ R_b).T)
    assert wrong["composition_error"] > 0.1
    assert wrong["wahba_composed"] < 1e-10  # still one rotation, just not the product
    # perturbing F_ba breaks it
    F_ba_pert = torch.tanh(F_ba) + 0.1 * random_embeddings(200, d, seed=74)
    pert = composition_error(F, F_a, F_b, F_ba_pert, group="O")
    assert pert["composition_error"] > 0.01
    assert pert["wahba_composed"] > 0.01
    assert pert["wahba_chain"] >= pert["wahba_composed"] - 1e-12


# ---------------------------------------------------------------------------------------------
# Equivariance report
# ---------------------------------------------------------------------------------------------


def test_report_invariant_embeddings_finite() -> None:
    F = random_embeddings(20, 4, seed=81, dtype=torch.float32)
    rep = equivariance_report(F, F.clone())
    assert isinstance(rep, EquivarianceReport)
    d = rep.as_dict()
    assert all(math.isfinite(float(v)) for v in d.values())
    assert rep.wahba_so_ratio == 0.0
    assert rep.wahba_o_ratio == 0.0
    assert rep.invariance_distance == 0.0
    assert (rep.gamma, rep.gamma_pairs, rep.gamma_degenerate_pairs) == (0.0, 0, 20 * 19)
    assert (d["n"], d["d"]) == (20, 4)
    # all-zero embeddings too
    zero = torch.zeros(5, 3)
    assert all(math.isfinite(float(v)) for v in equivariance_report(zero, zero).as_dict().values())


def test_report_pure_rotation_ratio_zero() -> None:
    F = random_embeddings(80, 6, seed=82)
    rep = equivariance_report(F, F @ random_rotation(6, 83).T)
    assert rep.invariance_distance > 0.5
    assert rep.wahba_so_ratio < 1e-10
    assert rep.gamma < 1e-20


# ---------------------------------------------------------------------------------------------
# Group fit for a bilinear form (Section 3.2)
# ---------------------------------------------------------------------------------------------


def hyperboloid_points(n: int, d: int, seed: int) -> torch.Tensor:
    return lift_to_hyperboloid(random_embeddings(n, d - 1, seed))


@pytest.mark.parametrize("form", ["minkowski", "symplectic", "euclidean"])
def test_group_fit_exact_group_element(form: str) -> None:
    d = 6
    if form == "minkowski":
        M = random_lorentz(d, _gen(1), max_rapidity=2.0)
        F = hyperboloid_points(60, d, 2)
    elif form == "symplectic":
        M = random_symplectic(d, _gen(1), scale=1.0)
        F = random_embeddings(60, d, 2)
    else:
        M = random_rotation(d, 1)
        F = random_embeddings(60, d, 2)
    fit = group_fit(F.float(), (F @ M.T).float(), form)
    assert isinstance(fit, GroupFitResult)
    assert fit.residual < 1e-5
    assert fit.deviation < 1e-4 and fit.relative_deviation < 1e-4
    assert torch.allclose(fit.matrix, M, atol=1e-4)
    fit64 = group_fit(F, F @ M.T, form_matrix(form, d))  # the matrix J works like its name
    assert fit64.residual < 1e-12 and fit64.deviation < 1e-10
    assert form_distortion(F, F @ M.T, form_matrix(form, d)) < 1e-10
    assert set(fit64.as_dict()) == {"residual", "deviation", "relative_deviation"}


def test_group_fit_non_group_linear_map_has_zero_residual_but_deviates() -> None:
    d = 6
    F = hyperboloid_points(60, d, 3)
    A = random_embeddings(d, d, 4)  # a generic linear map
    fit = group_fit(F, F @ A.T, "minkowski")
    assert fit.residual < 1e-10
    assert fit.deviation > 0.1
    J = form_matrix("minkowski", d)
    expected = float(torch.linalg.vector_norm(A.T @ J @ A - J))
    assert fit.deviation == pytest.approx(expected, rel=1e-8)
    assert fit.relative_deviation == pytest.approx(expected / math.sqrt(d), rel=1e-8)
    # the form's Gram matrix changes, by the naive formula
    gram = [[float(x @ J @ y) for y in F] for x in F]
    moved = F @ A.T
    gram_a = [[float(x @ J @ y) for y in moved] for x in moved]
    pairs = zip(gram, gram_a, strict=True)
    num = math.sqrt(sum((g - h) ** 2 for r, q in pairs for g, h in zip(r, q, strict=True)))
    den = math.sqrt(sum(g**2 for r in gram for g in r))
    distortion = form_distortion(F, moved, "minkowski")
    assert distortion == pytest.approx(num / den, rel=1e-8)
    assert distortion > 0.01
    # an orthogonal map that mixes x0 with a spatial axis is not a Lorentz map either
    mixing = random_rotation(d, 5)
    assert group_fit(F, F @ mixing.T, "minkowski").deviation > 0.1


def test_group_fit_residual_grows_with_noise() -> None:
    d = 5
    F = hyperboloid_points(80, d, 6)
    M = random_lorentz(d, _gen(7))
    clean = F @ M.T
    residuals = [
        group_fit(F, clean + s * random_embeddings(80, d, 8), "minkowski").residual
        for s in (0.0, 0.01, 0.1)
    ]
    assert residuals[0] < 1e-10 < residuals[1] < residuals[2]
    # equals the plain least-squares residual
    noisy = clean + 0.1 * random_embeddings(80, d, 8)
    assert residuals[2] == pytest.approx(linear_fit(F, noisy)[1], rel=1e-10)


def test_group_fit_bad_inputs_raise() -> None:
    F = random_embeddings(10, 5, 9)
    with pytest.raises(ValueError, match="even"):
        group_fit(F, F, "symplectic")
    with pytest.raises(ValueError, match="unknown bilinear form"):
        group_fit(F, F, "spherical")
    with pytest.raises(ValueError, match="same"):
        group_fit(F, F[:, :4], "minkowski")
    with pytest.raises(ValueError, match="NaN"):
        group_fit(F, F * float("nan"), "minkowski")


# ---------------------------------------------------------------------------------------------
# Blocked pairwise quantities (no n × n matrix held whole)
# ---------------------------------------------------------------------------------------------


def full_matrix_gamma(F: torch.Tensor, F_a: torch.Tensor, eps: float = 1e-12) -> float:
    """γ_f from whole n × n distance matrices (the naive reference of the blocked code)."""
    d_orig = torch.cdist(F, F) ** 2
    d_aug = torch.cdist(F_a, F_a) ** 2
    disp = ((F_a - F) ** 2).sum(dim=1)
    den = (disp[:, None] + disp[None, :]) ** 2
    valid = ~torch.eye(F.shape[0], dtype=torch.bool) & (den > eps)
    return float((((d_aug - d_orig) ** 2)[valid] / den[valid]).mean())


def full_matrix_form_distortion(F: torch.Tensor, F_a: torch.Tensor, form: str) -> float:
    """The form's distortion from the whole n × n Gram matrices."""
    J = form_matrix(form, F.shape[1], dtype=torch.float64)
    gram, gram_a = F @ J @ F.T, F_a @ J @ F_a.T
    return float(torch.linalg.matrix_norm(gram - gram_a) / torch.linalg.matrix_norm(gram))


@pytest.mark.parametrize("form", ["euclidean", "minkowski", "symplectic"])
def test_blocked_pairwise_metrics_equal_the_full_matrices(form: str) -> None:
    n, d = 53, 6
    F = random_embeddings(n, d, seed=71)
    F_a = F @ random_rotation(d, 72).T + 0.2 * random_embeddings(n, d, seed=73)
    gamma = full_matrix_gamma(F, F_a)
    distortion = full_matrix_form_distortion(F, F_a, form)
    for block in (1, 7, 16, n, 100, None):  # 7 and 16 do not divide 53
        got = relative_equivariance(F, F_a, block_rows=block)
        assert got[0] == pytest.approx(gamma, rel=1e-10)
        assert got[1:] == (n * (n - 1), 0)
        assert form_distortion(F, F_a, form, block_rows=block) == pytest.approx(
            distortion, rel=1e-10
        )
    with pytest.raises(ValueError, match="block_rows"):
        form_distortion(F, F_a, form, block_rows=0)


def test_default_blocks_split_large_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # with a budget of 300 pair entries per block, 40 rows go in blocks of 7 (not dividing 40);
    # the report's γ_f and the form's distortion still equal the whole-matrix values
    monkeypatch.setattr(metrics_equivariance, "_BLOCK_ELEMENTS", 300)
    assert metrics_equivariance._row_blocks(40) == range(0, 40, 7)
    F = random_embeddings(40, 5, seed=81)
    F_a = F + 0.3 * random_embeddings(40, 5, seed=82)
    F_a[:2] = F[:2]  # one degenerate pair (both ways)
    seen: list[tuple[int, ...]] = []
    matmul = torch.Tensor.__matmul__

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = matmul(a, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording)
    report = equivariance_report(F, F_a)
    distortion = form_distortion(F, F_a, "euclidean")
    monkeypatch.undo()
    assert (40, 40) not in seen and (7, 40) in seen  # n × n products only in row blocks
    assert report.gamma == pytest.approx(naive_gamma(F, F_a)[0], rel=1e-10)
    assert (report.gamma_pairs, report.gamma_degenerate_pairs) == (40 * 39 - 2, 2)
    assert distortion == pytest.approx(full_matrix_form_distortion(F, F_a, "euclidean"), rel=1e-10)
