"""Equivariance metrics for embeddings: Wahba's problem, relative equivariance γ_f, composition.

These measure how well one augmentation ``a`` acts on the embedding space as a single orthogonal
map (CARE paper, Section 4, "Measuring orthogonal action on embedding space"), and whether such
maps compose like a group action (Section 3.1, Corollary 1). For the other groups of Section 3.2
(the stabilisers ``ΛᵀJΛ = J`` of a bilinear form, e.g. the Lorentz group on the hyperboloid),
:func:`group_fit` is Wahba's analogue: the best linear map and its distance from the group.

Convention: rows are samples
----------------------------
Every function takes ``F`` and ``F_a`` as ``(n, d)`` tensors whose row ``i`` is ``f(x_i)`` and
``f(a(x_i))``. This is the **transpose** of the paper's ``d × n`` matrices, whose columns are the
embeddings. The paper's fit ``R F ≈ F_a`` (i.e. ``f(a(x)) ≈ R f(x)``) therefore reads
``F_a ≈ F Rᵀ`` here. Returned rotations are always the paper's ``R``: apply one to a single
embedding as ``R @ f(x)`` and to a batch of rows as ``F @ R.T``.

Numerics
--------
Inputs may be float32 (or any real dtype) on the CPU or a CUDA device. All linear algebra runs in
float64 on the input's device (MPS has no float64, so MPS inputs are computed on the CPU). Scalar
results are Python floats; matrices are float64 tensors. Errors are computed as norms of explicit
residuals, never through the trace identity ``||A||² + ||B||² - 2 tr(·)``, which cancels
catastrophically when the fit is good. Non-finite inputs raise :class:`ValueError`.

Memory is ``O(n · d)``: pairwise quantities (the Gram matrices of :func:`form_distortion`, the
distances of :func:`relative_equivariance`) are computed in blocks of rows against all ``n``
rows, about ``2**20`` entries (8 MiB of float64) per temporary, never as a whole ``n × n`` matrix
(unless ``n × n`` is itself that small).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from care.geometry import Form, form_matrix

_GROUPS = ("SO", "O")
# Relative threshold below which an invariance distance counts as zero (see EquivarianceReport).
_ZERO_REL = 1e-12
# Entries per (rows × n) block of a pairwise quantity: 2**20 float64 = 8 MiB per temporary.
_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _compute_device(device: torch.device) -> torch.device:
    """The device to run float64 linear algebra on: the input's, except MPS → CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def as_float64(x: Tensor, name: str, device: torch.device | None = None) -> Tensor:
    """``x`` detached, on the compute device (``device``, or ``x``'s own with MPS → CPU), as
    float64. The result may share memory with ``x`` (when it already is float64 there).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is complex or has NaN or Inf entries (the message names ``name``).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    dev = _compute_device(x.device) if device is None else device
    out = x.detach().to(device=dev, dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains NaN or Inf values; check the model's embeddings")
    return out


def embedding_pair(
    F: Tensor, F_a: Tensor, names: tuple[str, str] = ("F", "F_a")
) -> tuple[Tensor, Tensor]:
    """Check two ``(n, d)`` embedding matrices (rows = samples) of one shape with ``n, d >= 1``
    and return both through :func:`as_float64`, on ``F``'s compute device.

    Raises:
        ValueError: a non-2-D or empty input, mismatched shapes, complex or non-finite values
            (the messages name the inputs by ``names``).
    """
    for x, nm in zip((F, F_a), names, strict=True):
        if not isinstance(x, Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{nm} must be a 2-D (n, d) tensor with rows = samples, got {shape}")
    if F.shape != F_a.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same (n, d) shape, "
            f"got {tuple(F.shape)} and {tuple(F_a.shape)}"
        )
    if F.shape[0] < 1 or F.shape[1] < 1:
        raise ValueError(
            f"{names[0]} must have at least one row and one column, got {tuple(F.shape)}"
        )
    dev = _compute_device(F.device)
    return as_float64(F, names[0], dev), as_float64(F_a, names[1], dev)


def _row_blocks(n: int, block_rows: int | None = None) -> range:
    """Start rows of the blocks a ``(rows × n)`` pairwise computation over ``n`` rows takes:
    ``block_rows`` rows each, or by default about ``2**20`` entries (8 MiB of float64).

    Raises:
        ValueError: ``block_rows < 1``.
    """
    if block_rows is None:
        block_rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    elif block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return range(0, n, block_rows)


def _check_group(group: str) -> None:
    if group not in _GROUPS:
        raise ValueError(f"group must be 'SO' or 'O', got {group!r}")


# --------------------------------------------------------------------------------------------
# Wahba's problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WahbaResult:
    """Solution of Wahba's problem for one augmentation.

    Attributes:
        error: ``W_f = min_R ||R F - F_a||_Fro`` in the paper's ``d × n`` notation (paper, Sec. 4),
            equal to ``||F Rᵀ - F_a||_Fro`` with this module's rows-as-samples matrices.
        error_per_sqrt_n: ``error / √n``: the root-mean-square per-sample residual, comparable
            across batch sizes.
        rotation: the optimal ``(d, d)`` float64 matrix ``R``, with ``f(a(x)) ≈ R f(x)``.
        group: ``"SO"`` (``det R = +1``, the paper's definition) or ``"O"`` (reflections allowed).
    """

    error: float
    error_per_sqrt_n: float
    rotation: Tensor
    group: str


def _svd_cross(F: Tensor, F_a: Tensor) -> tuple[Tensor, Tensor]:
    """SVD of ``F_aᵀ F`` (the paper's ``F_a Fᵀ``); returns ``(U, Vᵀ)``."""
    U, _, Vh = torch.linalg.svd(F_a.T @ F)
    return U, Vh


def _rotation_from_svd(U: Tensor, Vh: Tensor, group: str) -> Tensor:
    """Kabsch/Wahba optimum ``U diag(1, …, 1, s) Vᵀ`` with ``s = det(U Vᵀ)`` for SO, 1 for O."""
    if group == "O":
        return U @ Vh
    D = torch.ones(U.shape[1], dtype=U.dtype, device=U.device)
    D[-1] = torch.sign(torch.linalg.det(U @ Vh))  # U Vᵀ is orthogonal: its det is ±1
    return (U * D) @ Vh


def _wahba(
    F: Tensor, F_a: Tensor, group: str, svd: tuple[Tensor, Tensor] | None = None
) -> WahbaResult:
    """Wahba's problem on validated float64 inputs (optionally reusing the cross-covariance SVD)."""
    U, Vh = _svd_cross(F, F_a) if svd is None else svd
    R = _rotation_from_svd(U, Vh, group)
    err = float(torch.linalg.vector_norm(F @ R.T - F_a).item())
    return WahbaResult(
        error=err,
        error_per_sqrt_n=err / math.sqrt(F.shape[0]),
        rotation=R,
        group=group,
    )


def wahba_error(F: Tensor, F_a: Tensor, group: str = "SO") -> WahbaResult:
    """Solve Wahba's problem ``W_f = min_{R ∈ G} ||R F - F_a||_Fro`` (paper, Section 4).

    ``F`` and ``F_a`` are ``(n, d)`` with row ``i`` = ``f(x_i)`` and ``f(a(x_i))`` — the transpose
    of the paper's ``d × n`` notation — so the fitted model is ``F_a ≈ F Rᵀ``, i.e.
    ``f(a(x)) ≈ R f(x)``.

    With the SVD ``U S Vᵀ = F_aᵀ F`` (the paper's ``F_a Fᵀ``), the optimum is
    ``R = U diag(1, …, 1, det(U Vᵀ)) Vᵀ`` for ``G = SO(d)`` (the paper's choice) and ``R = U Vᵀ``
    for ``G = O(d)``. The error is the Frobenius norm of the explicit residual ``F Rᵀ - F_a``.

    If ``F`` has rank below ``d - 1`` (e.g. ``n < d - 1``), ``R`` is not unique; the error still is.

    Args:
        F: ``(n, d)`` embeddings of the original inputs.
        F_a: ``(n, d)`` embeddings of the augmented inputs, same row order.
        group: ``"SO"`` or ``"O"``.

    Raises:
        ValueError: unknown ``group``, mismatched or non-2-D shapes, or non-finite values.
    """
    _check_group(group)
    F64, Fa64 = embedding_pair(F, F_a)
    return _wahba(F64, Fa64, group)


# --------------------------------------------------------------------------------------------
# Unconstrained linear fit
# --------------------------------------------------------------------------------------------


def _lstsq(F: Tensor, F_a: Tensor) -> Tensor:
    """Minimum-norm least-squares ``X`` with ``F X ≈ F_a`` (rank-deficiency safe)."""
    if F.device.type == "cpu":
        # gelsd: SVD-based, handles rank-deficient F (returns the minimum-norm solution).
        return torch.linalg.lstsq(F, F_a, rcond=None, driver="gelsd").solution
    # On CUDA torch.linalg.lstsq only offers 'gels', which assumes full rank; the
    # SVD-based pseudo-inverse gives the same minimum-norm solution for any rank.
    return torch.linalg.pinv(F) @ F_a


def _linear_fit(F: Tensor, F_a: Tensor) -> tuple[Tensor, float]:
    """:func:`linear_fit` on inputs already checked by :func:`embedding_pair`."""
    M = _lstsq(F, F_a).T
    res = float(torch.linalg.vector_norm(F @ M.T - F_a).item())
    return M, res / math.sqrt(F.shape[0])


def linear_fit(F: Tensor, F_a: Tensor) -> tuple[Tensor, float]:
    """Unconstrained least-squares map ``M = argmin_M ||F Mᵀ - F_a||_Fro`` and its residual.

    This is Wahba's problem without the orthogonality constraint: ``f(a(x)) ≈ M f(x)`` with any
    ``M ∈ R^{d×d}``. Its residual bounds the Wahba errors from below (``linear ≤ W_O ≤ W_SO``),
    so a large value means that ``a`` does not even act *linearly* on the embeddings.

    Rank-deficient ``F`` (e.g. ``n < d`` or embeddings confined to a subspace) is handled: the
    minimum-norm solution is returned.

    Returns:
        ``(M, residual)``: ``M`` is a ``(d, d)`` float64 tensor; ``residual`` is
        ``||F Mᵀ - F_a||_Fro / √n``.
    """
    return _linear_fit(*embedding_pair(F, F_a))


# --------------------------------------------------------------------------------------------
# Fit within the group of a bilinear form (Section 3.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupFitResult:
    """Best linear map for one augmentation and its distance from the group ``{Λ : ΛᵀJΛ = J}``.

    Attributes:
        residual: ``min_Λ ||F Λᵀ - F_a||_Fro / √n`` over all ``d × d`` matrices (the same value as
            :func:`linear_fit`'s residual): how far ``a`` is from acting linearly at all.
        deviation: ``||ΛᵀJΛ - J||_Fro`` for the least-squares ``Λ``: 0 when the fitted map lies in
            the group (e.g. a Lorentz map for ``J = diag(-1, 1, …, 1)``).
        relative_deviation: ``deviation / ||J||_Fro``, comparable across sizes and forms.
        matrix: the fitted ``(d, d)`` float64 ``Λ`` with ``f(a(x)) ≈ Λ f(x)``.

    :func:`form_distortion` measures the form's change without ``Λ``; unlike ``deviation`` it
    does not depend on directions the data barely spans, where the least-squares ``Λ`` is poorly
    determined.
    """

    residual: float
    deviation: float
    relative_deviation: float
    matrix: Tensor

    def as_dict(self) -> dict[str, float]:
        """The three numbers, for JSON (without the matrix)."""
        return {
            "residual": self.residual,
            "deviation": self.deviation,
            "relative_deviation": self.relative_deviation,
        }


def group_fit(F: Tensor, F_a: Tensor, J: Form) -> GroupFitResult:
    """Wahba's analogue for the group preserving ``B(x, y) = xᵀJy`` (paper, Sections 3.2 and 4).

    For the Lorentz or symplectic group there is no closed-form Procrustes solution, so this fits
    the unconstrained least-squares ``Λ`` (``F_a ≈ F Λᵀ``, rows = samples, as :func:`linear_fit`)
    and reports two numbers: its residual per √n (does ``a`` act linearly?) and its distance from
    the group, ``||ΛᵀJΛ - J||_Fro`` (is that linear action a symmetry of ``B``?). An exact group
    action gives 0 for both; a linear map outside the group gives residual 0 but deviation > 0.

    Args:
        F: ``(n, d)`` embeddings of the original inputs.
        F_a: ``(n, d)`` embeddings of the augmented inputs, same row order.
        J: the form: a name (``"euclidean"``, ``"minkowski"``, ``"symplectic"``) or a ``(d, d)``
            matrix (see :func:`care.geometry.form_matrix`).

    With ``n < d`` samples (rank-deficient ``F``), ``Λ`` is the minimum-norm solution and the
    deviation describes that choice, not an intrinsic property; use ``n > d``.

    Raises:
        ValueError: mismatched or non-2-D shapes, non-finite values, or an invalid form.
    """
    F64, Fa64 = embedding_pair(F, F_a)
    # form_matrix rejects a J that is not finite (care.geometry.check_form).
    J64 = form_matrix(J, F64.shape[1], dtype=torch.float64, device=F64.device)
    M, res = _linear_fit(F64, Fa64)
    dev = float(torch.linalg.vector_norm(M.T @ J64 @ M - J64).item())
    norm_j = float(torch.linalg.vector_norm(J64).item())
    return GroupFitResult(
        residual=res,
        deviation=dev,
        relative_deviation=dev / norm_j if norm_j > 0 else 0.0,
        matrix=M,
    )


def form_distortion(F: Tensor, F_a: Tensor, J: Form, *, block_rows: int | None = None) -> float:
    """``||F J Fᵀ - F_a J F_aᵀ||_Fro / ||F J Fᵀ||_Fro`` (rows = samples): how much the augmentation
    changes the form between the samples, which L_equi trains to 0 (paper, Sec. 3.2). Needs no
    fitted map, and is 0 for any ``Λ`` with ``ΛᵀJΛ = J``.

    The ``n × n`` Gram matrices are built ``block_rows`` rows at a time (default: about 1M
    entries per block) and their norms summed over the blocks, so memory is ``O(n · block)``.
    """
    F64, Fa64 = embedding_pair(F, F_a)
    n = F64.shape[0]
    starts = _row_blocks(n, block_rows)
    J64 = form_matrix(J, F64.shape[1], dtype=torch.float64, device=F64.device)
    FJ, FaJ = F64 @ J64, Fa64 @ J64
    gram_sq = torch.zeros((), dtype=torch.float64, device=F64.device)
    change_sq = torch.zeros((), dtype=torch.float64, device=F64.device)
    for start in starts:
        stop = min(start + starts.step, n)
        gram = FJ[start:stop] @ F64.T  # rows [start, stop) of F J Fᵀ
        gram_sq += torch.linalg.vector_norm(gram).square()
        change = (FaJ[start:stop] @ Fa64.T).sub_(gram)  # rows of F_a J F_aᵀ - F J Fᵀ
        change_sq += torch.linalg.vector_norm(change).square()
    gram_norm = float(gram_sq.sqrt().item())
    change_norm = float(change_sq.sqrt().item())
    return change_norm / gram_norm if gram_norm > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Relative equivariance γ_f
# --------------------------------------------------------------------------------------------


def relative_equivariance(
    F: Tensor,
    F_a: Tensor,
    eps: float = 1e-12,
    *,
    block_rows: int | None = None,
) -> tuple[float, int, int]:
    """Relative rotational equivariance ``γ_f`` for one augmentation (paper, Section 4).

    The paper defines ``γ_f = E_a E_{x,x'} {num / den}`` with::

        num = (||f(a(x')) - f(a(x))||² - ||f(x') - f(x)||²)²
        den = (||f(a(x')) - f(x')||² + ||f(a(x)) - f(x)||²)²

    This function evaluates the inner expectation for one augmentation: the mean of
    ``num / den`` over all ordered pairs ``(i, j)``, ``i ≠ j``, of the rows of ``F`` and ``F_a``
    (the ratio is symmetric, so this equals the mean over unordered pairs). The numerator measures
    how much ``a`` changes pairwise distances (zero for any orthogonal action); the denominator is
    the squared sum of the two displacements (zero only for a locally invariant pair). Average the
    result over sampled augmentations for the outer ``E_a``.

    Computed with Gram matrices in float64, processing ``block_rows`` rows at a time (default:
    about 1M pair entries per block, i.e. ~100 rows at n = 10 000), so memory is ``O(n · block)``.

    Degenerate pairs: pairs whose denominator ``den`` (the *squared* sum) is ``<= eps`` are
    excluded from the mean and counted. If every pair is degenerate (e.g. ``F_a == F``) or
    ``n < 2``, ``gamma`` is ``0.0`` with ``n_used = 0`` — never NaN.

    Returns:
        ``(gamma, n_pairs_used, n_degenerate)`` with ``n_pairs_used + n_degenerate = n (n - 1)``.
    """
    F64, Fa64 = embedding_pair(F, F_a)
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    n = F64.shape[0]
    starts = _row_blocks(n, block_rows)

    sq = (F64 * F64).sum(dim=1)  # ||f(x_i)||²
    sq_a = (Fa64 * Fa64).sum(dim=1)  # ||f(a(x_i))||²
    disp = ((Fa64 - F64) ** 2).sum(dim=1)  # ||f(a(x_i)) - f(x_i)||², computed directly
    total = torch.zeros((), dtype=torch.float64, device=F64.device)
    n_used = 0
    n_degenerate = 0
    cols = torch.arange(n, device=F64.device)
    for start in starts:
        stop = min(start + starts.step, n)
        rows = torch.arange(start, stop, device=F64.device)
        # Squared pairwise distances for rows [start, stop) against all n rows, as
        # (||u||² + ||v||²) - 2 u·v, in place to keep few (rows × n) temporaries alive.
        d_orig = (sq[start:stop, None] + sq[None, :]).sub_((F64[start:stop] @ F64.T).mul_(2.0))
        d_aug = (sq_a[start:stop, None] + sq_a[None, :]).sub_((Fa64[start:stop] @ Fa64.T).mul_(2.0))
        num = d_aug.sub_(d_orig).square_()
        del d_orig
        den = (disp[start:stop, None] + disp[None, :]).square_()
        valid = (rows[:, None] != cols[None, :]).logical_and_(den > eps)
        n_valid = int(valid.sum().item())
        n_used += n_valid
        n_degenerate += (stop - start) * n - (stop - start) - n_valid  # off-diagonal, not valid
        if n_valid:
            total += num.div_(den).masked_fill_(~valid, 0.0).sum()
    gamma = float(total.item()) / n_used if n_used else 0.0
    return gamma, n_used, n_degenerate


# --------------------------------------------------------------------------------------------
# Full report for one augmentation trial
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivarianceReport:
    """Everything measured for one augmentation trial (one batch ``F``, one augmentation ``a``).

    All distances are Frobenius norms divided by ``√n`` (root-mean-square per sample).

    Attributes:
        n: number of samples (rows).
        d: embedding dimension.
        wahba_so: ``W_f / √n`` over ``SO(d)`` (paper, Section 4).
        wahba_o: same over ``O(d)`` (reflections allowed).
        linear_residual: ``min_M ||F Mᵀ - F_a||_F / √n`` over all ``d × d`` matrices; large means
            ``a`` does not act linearly on the embeddings.
        invariance_distance: ``||F - F_a||_F / √n``, how far ``a`` moves embeddings at all.
        wahba_so_ratio: ``wahba_so / invariance_distance``, the share of the displacement that
            no rotation explains. Since ``R = I`` is admissible, ``W_SO <= ||F - F_a||``, so the
            ratio lies in ``[0, 1]`` (up to rounding): 0 = the displacement is a pure rotation,
            1 = rotating does no better than staying put. When ``invariance_distance`` is zero
            (at most ``1e-12`` times the embeddings' RMS norm), the Wahba error is zero too and
            the ratio is defined as ``0.0``: it is never NaN or inf.
        wahba_o_ratio: same for ``wahba_o``.
        gamma: relative equivariance ``γ_f`` for this augmentation (see
            :func:`relative_equivariance`).
        gamma_pairs: ordered pairs used for ``gamma``.
        gamma_degenerate_pairs: ordered pairs excluded because both displacements are ~zero.
    """

    n: int
    d: int
    wahba_so: float
    wahba_o: float
    linear_residual: float
    invariance_distance: float
    wahba_so_ratio: float
    wahba_o_ratio: float
    gamma: float
    gamma_pairs: int
    gamma_degenerate_pairs: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain ``{name: value}`` dict, ready for JSON or CSV."""
        return dict(asdict(self))


def _ratio(num: float, den: float, scale: float) -> float:
    """``num / den``, with 0.0 when ``den`` is zero relative to ``scale`` (see report docs)."""
    if den <= _ZERO_REL * scale:
        return 0.0
    return num / den


def equivariance_report(F: Tensor, F_a: Tensor) -> EquivarianceReport:
    """Compute all equivariance metrics of one augmentation trial (see :class:`EquivarianceReport`).

    ``F`` and ``F_a`` are ``(n, d)`` with rows = samples (the transpose of the paper's notation).
    The ``SO(d)`` and ``O(d)`` Wahba solutions share one SVD.
    """
    F64, Fa64 = embedding_pair(F, F_a)
    n, d = F64.shape
    sqrt_n = math.sqrt(n)
    svd = _svd_cross(F64, Fa64)
    w_so = _wahba(F64, Fa64, "SO", svd).error_per_sqrt_n
    w_o = _wahba(F64, Fa64, "O", svd).error_per_sqrt_n
    _, lin = _linear_fit(F64, Fa64)
    inv = float(torch.linalg.vector_norm(F64 - Fa64).item()) / sqrt_n
    scale = float(torch.sqrt((F64.square().sum() + Fa64.square().sum()) / (2 * n)).item())
    scale = max(scale, torch.finfo(torch.float64).tiny)
    gamma, used, degenerate = relative_equivariance(F64, Fa64)
    return EquivarianceReport(
        n=n,
        d=d,
        wahba_so=w_so,
        wahba_o=w_o,
        linear_residual=lin,
        invariance_distance=inv,
        wahba_so_ratio=_ratio(w_so, inv, scale),
        wahba_o_ratio=_ratio(w_o, inv, scale),
        gamma=gamma,
        gamma_pairs=used,
        gamma_degenerate_pairs=degenerate,
    )


# --------------------------------------------------------------------------------------------
# Composition (Corollary 1)
# --------------------------------------------------------------------------------------------


def composition_error(
    F: Tensor,
    F_a: Tensor,
    F_b: Tensor,
    F_ba: Tensor,
    group: str = "SO",
) -> dict[str, float]:
    """Check the homomorphism property ``ρ(b ∘ a) = ρ(b) ρ(a)`` (paper, Section 3.1, Corollary 1).

    ``F = f(x)``, ``F_a = f(a(x))``, ``F_b = f(b(x))`` and ``F_ba = f(b(a(x)))`` ("apply ``a``,
    then ``b``"), all ``(n, d)`` with rows = samples over the same inputs ``x``. ``R_a``, ``R_b``
    and ``R_{b∘a}`` each solve Wahba's problem against ``F``. For a true orthogonal group action,
    ``f(b(a(x))) = R_b R_a f(x)``, i.e. ``F_ba = F R_aᵀ R_bᵀ``.

    The rotations are unique only when ``F`` has rank ``>= d - 1``; use ``n > d`` samples.

    Returns:
        ``composition_error``: ``||R_{b∘a} - R_b R_a||_F / √d`` (0 for a homomorphism; at most
        ``2`` since each orthogonal matrix has norm ``√d``);
        ``wahba_composed``: ``W_f(F, F_ba) / √n``, how well *one* rotation explains ``b ∘ a``;
        ``wahba_chain``: ``||F R_aᵀ R_bᵀ - F_ba||_F / √n``, how well the *chained* rotations do.
    """
    _check_group(group)
    F64, Fa64 = embedding_pair(F, F_a, ("F", "F_a"))
    _, Fb64 = embedding_pair(F, F_b, ("F", "F_b"))
    _, Fba64 = embedding_pair(F, F_ba, ("F", "F_ba"))
    n, d = F64.shape
    R_a = _wahba(F64, Fa64, group).rotation
    R_b = _wahba(F64, Fb64, group).rotation
    composed = _wahba(F64, Fba64, group)
    chain = R_b @ R_a
    comp = float(torch.linalg.vector_norm(composed.rotation - chain).item()) / math.sqrt(d)
    chain_res = float(torch.linalg.vector_norm(F64 @ chain.T - Fba64).item()) / math.sqrt(n)
    return {
        "composition_error": comp,
        "wahba_composed": composed.error_per_sqrt_n,
        "wahba_chain": chain_res,
    }
