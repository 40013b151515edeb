"""Losses of CARE (paper, Section 3): InfoNCE = L_inv + L_unif, and the equivariance loss L_equi.

All functions are pure: they take embeddings and return scalar tensors. Embeddings are rows
(``(N, d)`` tensors); for the spherical losses they are expected to be L2-normalised, for the
hyperbolic ones (``similarity="lorentz"``) to lie on the hyperboloid (:mod:`care.geometry`).
L_equi takes any bilinear form (paper, Sec. 3.2).

The inputs are checked by shape and dtype only, which costs no host sync: embeddings must be
floating point, and a batch must hold as many rows as the loss needs (at least 2 for InfoNCE's
negatives and L_equi's groups, at least 1 for MoCo's queries); :class:`~care.errors.CareError`
says which and how to fix it. The values are never looked at (that would make the host wait for
the accelerator every step): NaN or infinite embeddings give a NaN loss, which the training step
catches on the device (:meth:`care.methods.base.ContrastiveMethod.record_nonfinite`).
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
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        with autocast_off(first.device):
            return loss(*args, **kwargs)

    return wrapper


def _check_float(loss: str, **tensors: Tensor) -> None:
    """Refuse integer (or bool, complex) embeddings, which the matmuls and logs cannot take."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CareError(
                f"{loss}: {name} has dtype {tensor.dtype}: pass float embeddings "
                f"(e.g. {name}.float())"
            )


def _check_pair(
    loss: str,
    z1: Tensor,
    z2: Tensor,
    *,
    names: tuple[str, str] = ("z1", "z2"),
    min_rows: int = 1,
) -> None:
    """Two ``(N, d)`` float tensors of one shape, ``N >= 1`` and ``d >= 1``, from the shapes and
    dtypes alone (no host sync); ``min_rows`` is what the error for an empty batch asks for.

    A shape mismatch is a ``ValueError`` (a caller's bug); the rest are :class:`CareError`.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"expected two (N, d) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    _check_float(loss, **{names[0]: z1, names[1]: z2})
    if z1.shape[1] == 0:
        raise CareError(
            f"{loss}: embeddings of shape {tuple(z1.shape)} have no coordinates: "
            "pass embeddings of size d >= 1"
        )
    if z1.shape[0] == 0:
        raise CareError(
            f"{loss}: {names[0]} and {names[1]} are empty (shape {tuple(z1.shape)}): "
            f"pass at least {min_rows} row{'s' if min_rows > 1 else ''} per view"
        )


def _check_group_size(loss: str, group_size: object) -> None:
    """Refuse a ``group_size`` that is not an int (``True`` and ``16.0`` included)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise CareError(
            f"{loss}: group_size={group_size!r} must be an int, not {type(group_size).__name__}: "
            "pass a whole number such as group_size=16"
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

    ``candidates1``/``candidates2`` (optional, both or neither) are the rows that anchors are
    compared against, e.g. both views gathered from all ranks under DDP; the local rows then sit at
    ``offset`` in them.

    Each anchor needs a negative, so the rows compared against must number at least 2 per view:
    without candidates the batch needs ``N >= 2`` (with ``N = 1`` the positive is the only other
    sample and the loss is 0 for any embeddings). With candidates, their rows are what counts: a
    local batch of one row (e.g. one sample per rank under DDP) is fine as long as the candidates
    hold at least 2 rows, since the other ranks' samples are its negatives. An empty local batch
    is refused (its mean over no anchors would be NaN).

    The inputs are checked by shape and dtype only (no host sync); NaN embeddings give a NaN loss.

    Raises:
        CareError: non-float embeddings or candidates, an empty batch or embedding size 0, fewer
            than 2 rows (of the batch, or of the candidates when given).
        ValueError: tensors of mismatched shapes, only one of the candidates, an ``offset`` that
            does not place the batch inside them, a bad temperature or similarity.
    """
    _check_pair("info_nce", z1, z2, min_rows=2 if candidates1 is None else 1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
    n = z1.shape[0]
    if candidates1 is None and candidates2 is None:
        c1, c2 = z1, z2
        if n < 2:
            raise CareError(
                "info_nce: a batch of 1 row has no negatives (the loss would be 0 for any "
                "embeddings): pass at least 2 rows per view (batch_size >= 2)"
            )
    elif candidates1 is None or candidates2 is None:
        raise ValueError("pass both candidates1 and candidates2, or neither")
    else:
        c1, c2 = candidates1, candidates2
        names = ("candidates1", "candidates2")
        _check_pair("info_nce", c1, c2, names=names, min_rows=2)
        if c1.shape[1] != z1.shape[1]:
            raise ValueError(
                f"candidates of shape {tuple(c1.shape)} do not match embeddings of size "
                f"{z1.shape[1]}"
            )
        if not 0 <= offset <= c1.shape[0] - n:
            raise ValueError(
                f"offset={offset} does not place {n} local rows inside {c1.shape[0]} candidates"
            )
        if c1.shape[0] < 2:
            raise CareError(
                "info_nce: candidates of 1 row leave no negatives: pass at least 2 candidate "
                "rows per view (batch_size >= 2, or the rows gathered from every rank)"
            )
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
    """NT-Xent loss L_InfoNCE = L_inv + L_unif (paper, Sec. 3, Eq. 1; Chen et al., 2020).

    ``similarity`` and ``curvature`` as in :func:`info_nce_terms`. The batch needs ``N >= 2``
    float rows per view (:class:`CareError` otherwise, from shapes and dtypes alone: no host
    sync); NaN embeddings give a NaN loss.
    """
    return info_nce_terms(z1, z2, temperature, similarity=similarity, curvature=curvature).total


@_outside_autocast
def equivariance_loss(
    z1: Tensor, z2: Tensor, group_size: int, *, form: Form = "euclidean"
) -> Tensor:
    """L_equi (paper, Eq. 3; Sec. 3 and 3.2) on groups of ``group_size`` consecutive rows.

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

    The inputs are checked by shape and dtype only (no host sync); NaN embeddings give a NaN loss.

    Raises:
        CareError: non-float embeddings, an empty batch or embedding size 0, a ``group_size``
            that is not an int, a batch not divisible into groups of at least 2, unknown form, a
            ``J`` of the wrong shape, or the symplectic form on an odd embedding size.
        ValueError: ``z1`` and ``z2`` of different shapes.
    """
    _check_pair("equivariance_loss", z1, z2)
    _check_group_size("equivariance_loss", group_size)
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
    """MoCo's InfoNCE (He et al., 2020, Eq. 1), split like :func:`info_nce_terms` into ``inv + unif``.

    Query ``i`` has the positive key ``i`` and the ``K`` rows of ``queue`` as negatives:
    ``-log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_j exp(q·n_j/τ))``, averaged over queries. Keys and queue
    carry no gradient (pass them detached); rows are expected to be L2-normalised.

    A batch of one query is fine (its negatives are the queue's), but the batch must not be empty
    and the queue must hold at least one row (with none, the loss is 0 for any embeddings). The
    inputs are checked by shape and dtype only (no host sync); NaN embeddings give a NaN loss.

    Raises:
        CareError: non-float query, key or queue, an empty batch or embedding size 0, an empty
            queue.
        ValueError: query and key of different shapes, a queue of the wrong width, a bad
            temperature.
    """
    _check_pair("moco_terms", query, key, names=("query", "key"))
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be (K, {query.shape[1]}), got {tuple(queue.shape)}")
    _check_float("moco_terms", queue=queue)
    if queue.shape[0] == 0:
        raise CareError(
            "moco_terms: the queue is empty, so the queries have no negatives: "
            "pass a queue of at least 1 row (queue_size >= 1)"
        )
    q = _full_precision(query)
    positives = (q * _full_precision(key)).sum(1, keepdim=True) / temperature  # (N, 1)
    negatives = q @ _full_precision(queue).T / temperature  # (N, K)
    inv = -positives.mean()
    unif = torch.logsumexp(torch.cat([positives, negatives], dim=1), dim=1).mean()
    return InfoNCETerms(inv=inv, unif=unif)
