"""Value tests of the losses against naive per-sample references and exact cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from care.errors import CareError
from care.geometry import (
    form_matrix,
    lift_to_hyperboloid,
    lorentz_similarity,
    random_lorentz,
    random_rotation,
    random_symplectic,
    squared_lorentz_distance,
)
from care.losses import equivariance_loss, info_nce, info_nce_terms, moco_terms
from care.models.heads import to_hyperboloid


def _sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


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
    identity = torch.eye(z1.shape[1], dtype=z1.dtype)
    return naive_equi_form(z1, z2, m, identity)


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


def test_inv_and_unif_match_their_definitions_per_anchor() -> None:
    """inv = -mean_i s(z_i, z_i⁺)/τ and unif = mean_i log Σ_{k≠i} exp(s(z_i, z_k)/τ), as loops."""
    z1, z2 = _sphere(10, 8, 5), _sphere(10, 8, 6)
    terms = info_nce_terms(z1, z2, 0.5)
    z = torch.cat([z1, z2]).tolist()
    n, tau = 10, 0.5
    inv, unif = 0.0, 0.0
    for i in range(2 * n):
        sims = [sum(a * b for a, b in zip(z[i], z[k], strict=True)) / tau for k in range(2 * n)]
        inv -= sims[(i + n) % (2 * n)]
        unif += math.log(sum(math.exp(s) for k, s in enumerate(sims) if k != i))
    assert terms.inv.item() == pytest.approx(inv / (2 * n), rel=1e-12)
    assert terms.unif.item() == pytest.approx(unif / (2 * n), rel=1e-12)


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
    rotated = [
        z1[g * m : (g + 1) * m] @ random_rotation(d, torch.Generator().manual_seed(100 + g)).T
        for g in range(groups)
    ]
    z2 = torch.cat(rotated)
    assert equivariance_loss(z1, z2, m).item() == pytest.approx(0.0, abs=1e-12)


def test_equivariance_loss_is_positive_when_a_group_is_not_orthogonally_mapped() -> None:
    m, d = 4, 8
    z1 = _sphere(2 * m, d, 14)
    z2 = torch.cat(
        [z1[:m] @ random_rotation(d, torch.Generator().manual_seed(1)).T, _sphere(m, d, 15)]
    )
    assert equivariance_loss(z1, z2, m).item() > 1e-3


def test_equivariance_loss_is_not_zero_for_orthogonal_maps_that_cross_groups() -> None:
    # one orthogonal map for the whole batch is zero; a different map per image is not
    z1 = _sphere(8, 6, 16)
    z2 = torch.stack(
        [z1[i] @ random_rotation(6, torch.Generator().manual_seed(200 + i)).T for i in range(8)]
    )
    assert equivariance_loss(z1, z2, 4).item() > 1e-3


def test_equivariance_loss_rejects_batches_that_groups_do_not_divide() -> None:
    z = _sphere(10, 4, 17)
    with pytest.raises(CareError, match="group_size=4"):
        equivariance_loss(z, z, 4)


def test_losses_have_finite_gradients() -> None:
    z1 = _sphere(8, 4, 24).requires_grad_()
    z2 = _sphere(8, 4, 25).requires_grad_()
    (info_nce(z1, z2, 0.1) + equivariance_loss(z1, z2, 4)).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert z2.grad is not None and torch.isfinite(z2.grad).all()


# ------------------------------------------------------------------ other groups (paper, Sec. 3.2)


def _hyperboloid(n: int, d: int, seed: int, curvature: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lift_to_hyperboloid(torch.randn(n, d - 1, generator=gen, dtype=torch.float64), curvature)


def _per_group(z: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    m = len(z) // len(maps)
    return torch.cat([z[g * m : (g + 1) * m] @ M.T for g, M in enumerate(maps)])


def _user_form(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-diagonal indefinite J = Aᵀ J_L A and a map in its group, A⁻¹ Λ A (Λ Lorentz)."""
    gen = torch.Generator().manual_seed(77)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        d, dtype=torch.float64
    )
    J = A.T @ form_matrix("minkowski", d) @ A
    return J, torch.linalg.solve(A, random_lorentz(d, gen, max_rapidity=1.5) @ A)


def naive_equi_form(z1: torch.Tensor, z2: torch.Tensor, m: int, J: torch.Tensor) -> float:
    """Loop over groups and pairs: mean_g (2/m) Σ_{i≠j} (z_iᵀJz_j - z'_iᵀJz'_j)²."""
    groups = len(z1) // m
    total = 0.0
    for g in range(groups):
        s = 0.0
        for i in range(m):
            for j in range(m):
                if i != j:
                    a = float(z1[g * m + i] @ J @ z1[g * m + j])
                    b = float(z2[g * m + i] @ J @ z2[g * m + j])
                    s += (a - b) ** 2
        total += 2.0 / m * s
    return total / groups


@pytest.mark.parametrize("form", ["euclidean", "minkowski", "symplectic", "user"])
@pytest.mark.parametrize("m", [2, 4])
def test_equivariance_loss_matches_naive_reference_for_each_form(form: str, m: int) -> None:
    d = 6
    J = _user_form(d)[0] if form == "user" else form_matrix(form, d)
    named: str | torch.Tensor = J if form == "user" else form
    z1, z2 = _hyperboloid(8, d, 30), _hyperboloid(8, d, 31)
    got = equivariance_loss(z1, z2, m, form=named).item()
    assert got == pytest.approx(naive_equi_form(z1, z2, m, J), rel=1e-9)


def test_euclidean_form_is_the_default_and_equals_the_identity_matrix() -> None:
    z1, z2 = _sphere(16, 6, 32), _sphere(16, 6, 33)
    plain = equivariance_loss(z1, z2, 4)
    assert equivariance_loss(z1, z2, 4, form="euclidean").item() == plain.item()
    as_matrix = equivariance_loss(z1, z2, 4, form=torch.eye(6, dtype=torch.float64))
    assert as_matrix.item() == pytest.approx(plain.item(), rel=1e-12)


def test_equivariance_loss_is_zero_for_one_lorentz_map_per_group() -> None:
    m, groups, d = 4, 5, 6
    J = form_matrix("minkowski", d)
    maps = [
        random_lorentz(d, torch.Generator().manual_seed(300 + g), max_rapidity=2.0)
        for g in range(groups)
    ]
    for L in maps:  # proper orthochronous Lorentz: det +1, Λ00 >= 1, ΛᵀJΛ = J
        assert torch.linalg.det(L).item() == pytest.approx(1.0, abs=1e-10)
        assert L[0, 0].item() >= 1.0
        assert torch.allclose(L.T @ J @ L, J, atol=1e-12)
    z1 = _hyperboloid(m * groups, d, 34)
    z2 = _per_group(z1, maps)
    assert equivariance_loss(z1, z2, m, form="minkowski").item() == pytest.approx(0.0, abs=1e-10)
    # the same maps are not orthogonal: the euclidean L_equi sees them
    assert equivariance_loss(z1, z2, m).item() > 1e-3


def test_equivariance_loss_is_positive_for_maps_outside_the_lorentz_group() -> None:
    m, d = 4, 6
    z1 = _hyperboloid(2 * m, d, 35)
    angle = 0.7  # a rotation mixing x0 with x1: orthogonal, but not a Lorentz map
    mixing = torch.eye(d, dtype=torch.float64)
    mixing[:2, :2] = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    generic = torch.randn(d, d, generator=torch.Generator().manual_seed(36), dtype=torch.float64)
    for M in (mixing, generic):
        z2 = _per_group(z1, [M, M])
        assert equivariance_loss(z1, z2, m, form="minkowski").item() > 1e-3


def test_equivariance_loss_is_zero_exactly_for_symplectic_maps_under_the_symplectic_form() -> None:
    m, groups, d = 4, 3, 8
    J = form_matrix("symplectic", d)
    maps = [
        random_symplectic(d, torch.Generator().manual_seed(400 + g), scale=1.0)
        for g in range(groups)
    ]
    for S in maps:
        assert torch.allclose(S.T @ J @ S, J, atol=1e-12)
    z1 = _sphere(m * groups, d, 37)
    z2 = _per_group(z1, maps)
    assert equivariance_loss(z1, z2, m, form="symplectic").item() == pytest.approx(0.0, abs=1e-10)
    generic = torch.randn(d, d, generator=torch.Generator().manual_seed(38), dtype=torch.float64)
    outside = _per_group(z1, [generic] * groups)
    assert equivariance_loss(z1, outside, m, form="symplectic").item() > 1e-3
    rotated = _per_group(
        z1, [random_rotation(d, torch.Generator().manual_seed(39))] * groups
    )  # O(2n) ⊄ Sp(2n)
    assert equivariance_loss(z1, rotated, m, form="symplectic").item() > 1e-3


def test_equivariance_loss_is_zero_for_maps_in_the_group_of_a_user_form() -> None:
    m, d = 4, 5
    J, in_group = _user_form(d)
    assert torch.allclose(in_group.T @ J @ in_group, J, atol=1e-9)
    z1 = _hyperboloid(2 * m, d, 40)
    z2 = _per_group(z1, [in_group, in_group])
    assert equivariance_loss(z1, z2, m, form=J).item() == pytest.approx(0.0, abs=1e-10)
    generic = torch.randn(d, d, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    assert equivariance_loss(z1, _per_group(z1, [generic] * 2), m, form=J).item() > 1e-3


def test_symplectic_form_on_an_odd_size_is_a_one_line_care_error() -> None:
    z = _sphere(8, 5, 42)
    with pytest.raises(CareError, match="even embedding size, got 5") as info:
        equivariance_loss(z, z, 4, form="symplectic")
    assert "\n" not in str(info.value) and "head_out" in str(info.value)
    with pytest.raises(CareError, match="unknown bilinear form"):
        equivariance_loss(z, z, 4, form="hyperbolic")
    with pytest.raises(CareError, match=r"\(5, 5\)"):
        equivariance_loss(z, z, 4, form=torch.eye(4))


def naive_lorentz_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float, c: float) -> float:
    """Loop over the 2N anchors with s(x, y) = -d_L²(x, y)/2 = 1/c - x0 y0 + Σ_k x_k y_k."""
    z = torch.cat([z1, z2]).tolist()
    n = len(z1)

    def sim(x: list[float], y: list[float]) -> float:
        d2 = -2.0 / c - 2.0 * (-x[0] * y[0] + sum(a * b for a, b in zip(x[1:], y[1:], strict=True)))
        return -d2 / 2.0

    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {k: sim(z[i], z[k]) / tau for k in range(2 * n)}
        denominator = sum(math.exp(s) for k, s in sims.items() if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize(("tau", "c"), [(0.1, 1.0), (0.5, 0.5), (1.0, 3.0)])
def test_lorentz_info_nce_matches_naive_reference(tau: float, c: float) -> None:
    z1 = to_hyperboloid(_sphere(6, 5, 43) * 2.0, c)
    z2 = to_hyperboloid(_sphere(6, 5, 44) * 0.5, c)
    got = info_nce(z1, z2, tau, similarity="lorentz", curvature=c).item()
    assert got == pytest.approx(naive_lorentz_nt_xent(z1, z2, tau, c), rel=1e-9)
    terms = info_nce_terms(z1, z2, tau, similarity="lorentz", curvature=c)
    d2 = squared_lorentz_distance(z1, z2, c)
    assert terms.inv.item() == pytest.approx((d2 / 2 / tau).mean().item(), rel=1e-9)


def test_lorentz_info_nce_with_candidates_equals_the_plain_loss_per_anchor() -> None:
    z1, z2 = _hyperboloid(6, 4, 45), _hyperboloid(6, 4, 46)
    kw = {"similarity": "lorentz", "curvature": 1.0}
    local = info_nce_terms(z1[2:4], z2[2:4], 0.3, candidates1=z1, candidates2=z2, offset=2, **kw)
    z = torch.cat([z1, z2])
    logits = lorentz_similarity(z, z) / 0.3
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    per_anchor = functional.cross_entropy(logits, target, reduction="none")
    assert local.total.item() == pytest.approx(per_anchor[[2, 3, 8, 9]].mean().item(), rel=1e-9)


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hyperboloid_losses_have_finite_gradients_near_and_far_from_the_apex(
    scale: float, dtype: torch.dtype
) -> None:
    # head outputs u at the apex (0, also exactly equal positives), near it, and far (|u| ~ 1e3)
    gen = torch.Generator().manual_seed(47)
    u1 = (torch.randn(8, 5, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    u2 = u1.detach().clone().requires_grad_()  # positives coincide exactly
    z1, z2 = to_hyperboloid(u1, 1.0), to_hyperboloid(u2, 1.0)
    terms = info_nce_terms(z1, z2, 0.1, similarity="lorentz")
    loss = terms.total + equivariance_loss(z1, z2.flip(0), 4, form="minkowski")
    assert torch.isfinite(loss)
    loss.backward()
    for u in (u1, u2):
        assert u.grad is not None and torch.isfinite(u.grad).all()
    # the soft clip bounds the logits: 0 <= d_L² <= 4 r² with r = 1
    d2 = -2 * lorentz_similarity(z1.detach().double(), z2.detach().double())
    assert d2.min().item() > -1e-5 and d2.max().item() <= 4.0 + 1e-5


def test_bad_similarity_is_rejected() -> None:
    z = _sphere(4, 3, 48)
    with pytest.raises(ValueError, match="similarity"):
        info_nce_terms(z, z, 0.5, similarity="cosine")
    with pytest.raises(ValueError, match="curvature"):
        info_nce_terms(z, z, 0.5, similarity="lorentz", curvature=0.0)


def test_losses_compute_in_float32_under_autocast() -> None:
    """Under bf16 autocast (a bf16-mixed step), every loss gives exactly its float32 value:
    autocast is off inside them, and bf16 embeddings are computed in float32."""
    z1, z2, queue = (_sphere(n, 16, seed).float() for n, seed in ((8, 1), (8, 2), (24, 3)))
    cases = {
        "info_nce": lambda a, b: info_nce(a, b, 0.1),
        "lorentz": lambda a, b: info_nce_terms(a, b, 0.1, similarity="lorentz").total,
        "equi": lambda a, b: equivariance_loss(a, b, 4),
        "moco": lambda a, b: moco_terms(a, b, queue, 0.2).total,
    }
    for name, loss in cases.items():
        expected = loss(z1, z2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = loss(z1, z2)
            assert (z1 @ z2.T).dtype == torch.bfloat16  # autocast is on around the loss
        assert under_autocast.dtype == torch.float32, name
        assert torch.equal(under_autocast, expected), name
        half = loss(z1.bfloat16(), z2.bfloat16())  # bf16 embeddings: upcast, then float32 math
        assert half.dtype == torch.float32
        assert torch.equal(half, loss(z1.bfloat16().float(), z2.bfloat16().float())), name
