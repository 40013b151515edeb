"""Losses of CARE (paper, Section 3): InfoNCE = L_inv + L_unif, and the equivariance loss L_equi.

All functions are pure: they take embeddings and return scalar tensors. Embeddings are rows
(``(N, d)`` tensors); for the spherical losses they are expected to be L2-normalised, for the
hyperbolic ones (``similarity="lorentz"``) to lie on the hyperboloid (:mod:`care.geometry`).
L_equi takes any bilinear form (paper, Sec. 3.2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from care.errors import CareError
from care.geometry import Form, apply_form, check_form, lorentz_similarity
from care.hardware import autocast_off

_P = ParamSpec("_P")
_R = TypeVar("_R")

SIMILARITIES = ("dot", "lorentz")
"""InfoNCE similarities: ``dot`` (cosine on the sphere), ``lorentz`` (``-d_L²/2`` on the
hyperboloid)."""


@dataclass(frozen=True)
class InfoNCETerms:
    """The two parts of NT-Xent: ``info_nce = inv + unif`` (Wang & Isola, 2020; paper, Sec. 3)."""

    inv: Tensor
    """Alignment term: ``-mean_i s(z_i, z_i^+) / τ``, minimised by invariant embeddings."""
    unif: Tensor
    """Uniformity term: ``mean_i log Σ_{k≠i} exp(s(z_i, z_k) / τ)``, minimised by spread-out ones."""

    @property
    def total(self) -> Tensor:
        return self.inv + self.unif


def _full_precision(x: Tensor) -> Tensor:
    """Half-precision inputs (under autocast) are computed in float32; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _outside_autocast(loss: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``loss`` with autocast off on its first tensor's device, so that under mixed
    precision its matmuls, exps and logs compute in float32 (with :func:`_full_precision`)."""

    @functools.wraps(loss)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        first = next(a for a in args if isinstance(a, Tensor))
        with autocast_off(first.device):
            return loss(*args, **kwargs)

    return wrapper


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"expected two (N, d) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )


@_outside_autocast
def info_nce_terms(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    *,
    candidates1: Tensor | None = None,
    candidates2: Tensor | None = None,
    offset: int = 0,
    similarity: str = "dot",
    curvature: float = 1.0,
) -> InfoNCETerms:
    """NT-Xent (SimCLR) over the 2N samples, split into ``inv`` and ``unif``.

    Sample ``i`` of view 1 has the positive ``i`` of view 2 and the 2N - 2 other samples as negatives
    (and symmetrically). The loss is averaged over all 2N anchors. The logits are ``s(x, y) / τ``:

    - ``similarity="dot"``: ``s = xᵀy``; pass L2-normalised embeddings for cosine similarity.
    - ``similarity="lorentz"`` (paper, Sec. 3.2): rows on the hyperboloid of curvature ``-c``
      (``curvature``), ``s = -d_L²(x, y)/2 = 1/c + ⟨x, y⟩_L``, minus half the squared Lorentzian
      distance (Law et al., 2019). It is the sphere's ``xᵀy = 1 - |x - y|²/2`` with the squared
      chord replaced, a polynomial in the coordinates (finite gradients at ``x = y``, where the
      geodesic distance's ``arcosh`` has an infinite one), and with the head's soft clip
      (:func:`care.models.heads.to_hyperboloid`) its range ``[-2r², 0]`` matches the cosine's for
      ``r = 1``, so the temperature carries over.

    ``candidates1``/``candidates2`` (optional) are the rows that anchors are compared against, e.g.
    both views gathered from all ranks under DDP; the local rows then sit at ``offset`` in them.
    """
    _check_pair(z1, z2)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
    n = z1.shape[0]
    c1 = z1 if candidates1 is None else candidates1
    c2 = z2 if candidates2 is None else candidates2
    anchors = _full_precision(torch.cat([z1, z2]))  # (2n, d)
    candidates = _full_precision(torch.cat([c1, c2]))  # (2M, d)
    m = c1.shape[0]
    if similarity == "lorentz":
        logits = lorentz_similarity(anchors, candidates, curvature) / temperature  # -d_L²/2 / τ
    else:
        logits = anchors @ candidates.T / temperature  # (2n, 2M)
    rows = torch.arange(2 * n, device=z1.device)
    local = torch.arange(n, device=z1.device) + offset
    self_cols = torch.cat([local, local + m])
    positive_cols = torch.cat([local + m, local])
    positives = logits[rows, positive_cols]
    logits = logits.index_put((rows, self_cols), logits.new_full((), float("-inf")))
    inv = -positives.mean()
    unif = torch.logsumexp(logits, dim=1).mean()
    return InfoNCETerms(inv=inv, unif=unif)


def info_nce(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    *,
    similarity: str = "dot",
    curvature: float = 1.0,
) -> Tensor:
    """NT-Xent loss L_InfoNCE = L_inv + L_unif (paper, Sec. 3; Chen et al., 2020).

    ``similarity`` and ``curvature`` as in :func:`info_nce_terms`.
    """
    return info_nce_terms(z1, z2, temperature, similarity=similarity, curvature=curvature).total


@_outside_autocast
def equivariance_loss(
    z1: Tensor, z2: Tensor, group_size: int, *, form: Form = "euclidean"
) -> Tensor:
    """L_equi (paper, Sec. 3 and 3.2) on groups of ``group_size`` consecutive rows.

    Rows ``g*m .. g*m+m-1`` of ``z1`` are one group under augmentation ``a_g`` and the same rows of
    ``z2`` the group under ``a'_g``. Per group the loss is
    ``(2/m) · Σ_{i≠j} (B(z_i, z_j) - B(z'_i, z'_j))²`` (the official implementation's scale, so the
    paper's λ values carry over), averaged over groups, with the bilinear form
    ``B(x, y) = xᵀ J y`` named by ``form`` (:mod:`care.geometry`): ``"euclidean"`` (``J = I``, the
    paper's ``<z_i, z_j>``, group ``O(d)``), ``"minkowski"`` (``J = diag(-1, 1, …, 1)``, Lorentz
    group ``O(1, d-1)``), ``"symplectic"`` (``J = [[0, I], [-I, 0]]``, ``Sp(d)``, even ``d``) or a
    ``(d, d)`` tensor ``J``. It is zero exactly when the groups' Gram matrices under ``B`` agree,
    e.g. when ``z2 = z1 @ Λ.T`` with ``ΛᵀJΛ = J`` per group. Batched, no Python loop; the
    euclidean form costs no extra multiply.

    Raises:
        CareError: batch not divisible into groups, unknown form, a ``J`` of the wrong shape, or
            the symplectic form on an odd embedding size.
    """
    _check_pair(z1, z2)
    n, d = z1.shape
    if group_size < 2 or n % group_size != 0:
        raise CareError(
            f"{n} embeddings do not split into groups of group_size={group_size}: "
            "choose a batch_size divisible by group_size (and group_size >= 2)"
        )
    check_form(form, d)
    groups = n // group_size
    a = _full_precision(z1).reshape(groups, group_size, d)
    b = _full_precision(z2).reshape(groups, group_size, d)
    # apply_form returns the rows themselves for the euclidean form: no extra multiply.
    diff = apply_form(a, form) @ a.transpose(1, 2) - apply_form(b, form) @ b.transpose(1, 2)
    # The diagonal holds B(z_i, z_i) - B(z'_i, z'_i); the sum runs over i != j only.
    squared = diff.square().sum(dim=(1, 2)) - torch.diagonal(diff, dim1=1, dim2=2).square().sum(1)
    return (2.0 / group_size) * squared.mean()


@_outside_autocast
def moco_terms(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> InfoNCETerms:
    """MoCo's InfoNCE (He et al., 2020), split like :func:`info_nce_terms` into ``inv + unif``.

    Query ``i`` has the positive key ``i`` and the ``K`` rows of ``queue`` as negatives:
    ``-log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_j exp(q·n_j/τ))``, averaged over queries. Keys and queue
    carry no gradient (pass them detached); rows are expected to be L2-normalised.
    """
    _check_pair(query, key)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (K, {query.shape[1]}), got {tuple(queue.shape)}")
    q = _full_precision(query)
    positives = (q * _full_precision(key)).sum(1, keepdim=True) / temperature  # (N, 1)
    negatives = q @ _full_precision(queue).T / temperature  # (N, K)
    inv = -positives.mean()
    unif = torch.logsumexp(torch.cat([positives, negatives], dim=1), dim=1).mean()
    return InfoNCETerms(inv=inv, unif=unif)
