"""Bilinear forms and the hyperboloid: the geometry behind CARE beyond the sphere (paper, Sec. 3.2).

L_equi only compares pairwise values of a bilinear form ``B(x, y) = xᵀ J y``; the group whose
action it learns is the group that preserves ``B``, ``{Λ : Λᵀ J Λ = J}`` (paper, Sec. 3.2):

==============  ======================================  =========================================
form            ``J`` (``d × d``)                       group
==============  ======================================  =========================================
``euclidean``   ``I``                                   ``O(d)`` (the paper's main case)
``minkowski``   ``diag(-1, 1, …, 1)``                   Lorentz group ``O(1, d-1)``
``symplectic``  ``[[0, I], [-I, 0]]`` (``d = 2n``)      ``Sp(2n)``; ``Sp(2n) ∩ O(2n) = U(n)``
a tensor        any ``(d, d)`` matrix                   its stabiliser
==============  ======================================  =========================================

Rows are samples everywhere: for ``(n, d)`` matrices ``X``, ``Y`` the pairwise values are
``X J Yᵀ``, computed by :func:`apply_form` (``X ↦ X J``) without a matrix multiply for the named
forms. A map ``Λ`` acts on a row ``x`` as ``Λ x`` (on a batch as ``X Λᵀ``).

The hyperboloid (Lorentz model) of curvature ``-c`` is
``H = {x = (x₀, u) ∈ R^{1+d} : ⟨x, x⟩_L = -1/c, x₀ > 0}`` with the Minkowski product
``⟨x, y⟩_L = -x₀ y₀ + uᵀv``; its linear isometries are the proper orthochronous Lorentz maps.
This module imports nothing from :mod:`care` except :mod:`care.errors`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from care.errors import CareError

__all__ = [
    "FORMS",
    "Form",
    "apply_form",
    "bilinear",
    "check_form",
    "form_matrix",
    "lift_to_hyperboloid",
    "lorentz_distance",
    "lorentz_similarity",
    "minkowski_inner",
    "random_lorentz",
    "random_symplectic",
    "soft_clip",
    "squared_lorentz_distance",
]

FORMS = ("euclidean", "minkowski", "symplectic")
"""The named bilinear forms (paper, Sec. 3.2)."""

Form = str | Tensor
"""A form's name in :data:`FORMS`, or a user ``(d, d)`` matrix ``J``."""


# --------------------------------------------------------------------------------------------
# Bilinear forms
# --------------------------------------------------------------------------------------------


def check_form(form: Form, d: int) -> None:
    """Raise :class:`CareError` (one line) unless ``form`` is a valid form on ``R^d``."""
    if isinstance(form, Tensor):
        if form.shape != (d, d):
            raise CareError(
                f"the bilinear form J has shape {tuple(form.shape)} but the embeddings have size "
                f"{d}: pass a ({d}, {d}) matrix"
            )
        if form.is_complex() or not bool(torch.isfinite(form).all()):
            raise CareError("the bilinear form J must be a real matrix with finite entries")
        return
    if form not in FORMS:
        raise CareError(
            f"unknown bilinear form {form!r}: choose one of {list(FORMS)} or pass a (d, d) matrix"
        )
    if form == "symplectic" and d % 2 != 0:
        raise CareError(
            f"the symplectic form needs an even embedding size, got {d}: choose an even "
            "head_out on the sphere (an odd one on the hyperboloid, which adds a coordinate)"
        )
    if form == "minkowski" and d < 2:
        raise CareError(f"the minkowski form needs an embedding size of at least 2, got {d}")


def form_matrix(
    form: Form,
    d: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``(d, d)`` matrix ``J`` of a named form, or a user ``J`` checked and cast.

    ``euclidean``: ``I``; ``minkowski``: ``diag(-1, 1, …, 1)``; ``symplectic``:
    ``[[0, I_n], [-I_n, 0]]`` with ``d = 2n`` (odd ``d`` raises :class:`CareError`).
    """
    check_form(form, d)
    if isinstance(form, Tensor):
        return form.to(dtype=dtype, device=device)
    J = torch.eye(d, dtype=dtype, device=device)
    if form == "minkowski":
        J[0, 0] = -1.0
    elif form == "symplectic":
        n = d // 2
        eye = torch.eye(n, dtype=dtype, device=device)
        J = torch.zeros(d, d, dtype=dtype, device=device)
        J[:n, n:] = eye
        J[n:, :n] = -eye
    return J


def apply_form(x: Tensor, form: Form) -> Tensor:
    """``x J`` for rows ``x`` (shape ``(..., d)``), so that ``apply_form(X, J) @ Y.T = X J Yᵀ``.

    Named forms cost no matrix multiply: ``euclidean`` returns ``x`` itself, ``minkowski`` negates
    coordinate 0 and ``symplectic`` maps ``(p, q) ↦ (-q, p)``. Call :func:`check_form` first.
    """
    if isinstance(form, Tensor):
        return x @ form.to(dtype=x.dtype, device=x.device)
    if form == "euclidean":
        return x
    if form == "minkowski":
        return torch.cat([-x[..., :1], x[..., 1:]], dim=-1)
    if form == "symplectic":
        n = x.shape[-1] // 2
        return torch.cat([-x[..., n:], x[..., :n]], dim=-1)
    raise CareError(f"unknown bilinear form {form!r}: choose one of {list(FORMS)}")


def bilinear(x: Tensor, y: Tensor, form: Form = "euclidean") -> Tensor:
    """Pairwise values ``B(x_i, y_k) = x_iᵀ J y_k`` of rows: ``(n, d), (m, d) → (n, m)``."""
    check_form(form, x.shape[-1])
    return apply_form(x, form) @ y.transpose(-2, -1)


# --------------------------------------------------------------------------------------------
# The hyperboloid (Lorentz model)
# --------------------------------------------------------------------------------------------


def _check_curvature(curvature: float) -> None:
    if not curvature > 0:
        raise CareError(f"bad value for 'curvature': {curvature}; it must be positive")


def minkowski_inner(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Minkowski product ``⟨x, y⟩_L = -x₀ y₀ + Σ_{k≥1} x_k y_k`` (broadcasting rows)."""
    prod = x * y
    return prod[..., 1:].sum(-1) - prod[..., 0]


def soft_clip(u: Tensor, radius: float) -> Tensor:
    """Smooth norm clip ``u ↦ u / √(1 + |u|²/r²)``: the identity near 0, norm always below ``r``.

    A smooth variant of the feature clip of Guo et al. (2022, "Clipped hyperbolic classifiers are
    super-hyperbolic classifiers"), ``min(1, r/|u|) u``. It is 1-Lipschitz and analytic everywhere
    (also at ``u = 0``), and unlike the hard clip it keeps a (decaying) gradient along ``u``, so a
    point pushed outwards can still be pulled back towards the apex.
    """
    if not radius > 0:
        raise CareError(f"the clip radius must be positive, got {radius}")
    return u * torch.rsqrt(1.0 + u.square().sum(-1, keepdim=True) / radius**2)


def lift_to_hyperboloid(u: Tensor, curvature: float = 1.0) -> Tensor:
    """Lift ``u ∈ R^d`` to ``x = (x₀, u) ∈ R^{1+d}`` with ``x₀ = √(1/c + |u|²)``.

    Then ``⟨x, x⟩_L = -1/c``: ``x`` lies on the upper sheet of the hyperboloid of curvature
    ``-c`` (for ``c = 1``, ``x₀ = √(1 + |u|²)``). ``u = 0`` is the apex ``(1/√c, 0, …, 0)``.
    The lift is smooth (``x₀ ≥ 1/√c > 0``) and its inverse is dropping ``x₀``.
    """
    _check_curvature(curvature)
    x0 = torch.sqrt(1.0 / curvature + u.square().sum(-1, keepdim=True))
    return torch.cat([x0, u], dim=-1)


def squared_lorentz_distance(x: Tensor, y: Tensor, curvature: float = 1.0) -> Tensor:
    """Row-wise squared Lorentzian distance ``d_L²(x, y) = |x - y|²_L = -2/c - 2⟨x, y⟩_L``.

    Law et al. (2019, "Lorentzian distance learning for hyperbolic representations"): for points
    on the hyperboloid it is ``≥ 0``, zero only at ``x = y``, increasing in the geodesic distance
    ``ρ`` (``d_L² = (2/c)(cosh(√c ρ) - 1)``), and a polynomial in the coordinates, so it is smooth
    everywhere, including at ``x = y``. Rounding below zero is clamped to 0.
    """
    _check_curvature(curvature)
    return (-2.0 / curvature - 2.0 * minkowski_inner(x, y)).clamp_min(0.0)


def lorentz_similarity(x: Tensor, y: Tensor, curvature: float = 1.0) -> Tensor:
    """Pairwise similarity ``s(x, y) = -d_L²(x, y) / 2 = 1/c + ⟨x, y⟩_L``: ``(n, 1+d), (m, 1+d)
    → (n, m)``.

    The sphere's analogue: for unit vectors ``⟨z, z'⟩ = 1 - |z - z'|²/2``, so InfoNCE's cosine
    logits are minus half the squared chord up to a constant; here the squared chord becomes the
    squared Lorentzian distance. No clamp, so the gradient is the (linear) one of ``⟨x, y⟩_L``.
    """
    _check_curvature(curvature)
    return 1.0 / curvature + bilinear(x, y, "minkowski")


def lorentz_distance(x: Tensor, y: Tensor, curvature: float = 1.0) -> Tensor:
    """Row-wise geodesic distance ``ρ(x, y) = arcosh(-c ⟨x, y⟩_L) / √c`` on the hyperboloid.

    For measurement and docs; its gradient is infinite at ``x = y`` (``arcosh'(1) = ∞``), so the
    losses use :func:`lorentz_similarity` instead.
    """
    _check_curvature(curvature)
    arg = (-curvature * minkowski_inner(x, y)).clamp_min(1.0)
    return torch.acosh(arg) / math.sqrt(curvature)


# --------------------------------------------------------------------------------------------
# Random group elements (for tests and docs)
# --------------------------------------------------------------------------------------------


def random_rotation(
    d: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Haar-random ``Q ∈ SO(d)``: QR of a Gaussian matrix with the sign fix, det forced to +1."""
    A = torch.randn(d, d, generator=generator, dtype=dtype)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R))
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def random_lorentz(
    d: int,
    generator: torch.Generator | None = None,
    *,
    max_rapidity: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A random proper orthochronous Lorentz map ``Λ = boost ∘ rotation`` on ``R^d`` (``d ≥ 2``).

    The rotation is ``diag(1, Q)`` with ``Q`` Haar-random in ``SO(d-1)``; the boost has a random
    direction ``n`` and rapidity ``φ`` uniform in ``[0, max_rapidity]``:
    ``[[cosh φ, sinh φ nᵀ], [sinh φ n, I + (cosh φ - 1) n nᵀ]]``. So ``ΛᵀJΛ = J`` with
    ``J = diag(-1, 1, …, 1)``, ``det Λ = +1`` and ``Λ₀₀ = cosh φ ≥ 1``; it maps the hyperboloid
    onto itself.
    """
    check_form("minkowski", d)
    rotation = torch.eye(d, dtype=dtype)
    rotation[1:, 1:] = random_rotation(d - 1, generator, dtype)
    direction = torch.randn(d - 1, generator=generator, dtype=dtype)
    direction = direction / direction.norm()
    phi = float(torch.rand((), generator=generator, dtype=dtype)) * max_rapidity
    boost = torch.eye(d, dtype=dtype)
    boost[0, 0] = math.cosh(phi)
    boost[0, 1:] = math.sinh(phi) * direction
    boost[1:, 0] = math.sinh(phi) * direction
    boost[1:, 1:] += (math.cosh(phi) - 1.0) * torch.outer(direction, direction)
    return boost @ rotation


def random_symplectic(
    d: int,
    generator: torch.Generator | None = None,
    *,
    scale: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A random symplectic ``S = exp(J H)`` on ``R^d`` (``d = 2n``): ``SᵀJS = J``, ``det S = 1``.

    ``H`` is a random symmetric matrix scaled by ``scale / √d``; ``J H`` is then Hamiltonian, and
    its exponential lies in the connected group ``Sp(2n)``. Odd ``d`` raises :class:`CareError`.
    """
    J = form_matrix("symplectic", d, dtype=dtype)
    A = torch.randn(d, d, generator=generator, dtype=dtype)
    H = (A + A.T) * (scale / (2.0 * math.sqrt(d)))
    return torch.linalg.matrix_exp(J @ H)
