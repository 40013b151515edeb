"""Augmentation-parameter probes: how much of an augmentation's parameters embeddings encode.

An equivariant representation lets a learner recover the parameters of the augmentation ``a``
(crop scale, jitter strength, …) from ``(f(x), f(a(x)))``; an invariant one cannot (SIE, AugSelf).
:func:`parameter_probe` fits a closed-form ridge regression and a one-hidden-layer MLP and reports
their held-out R² per parameter. Inputs are checked as :mod:`care.metrics.equivariance` checks
embeddings (rows = samples, real and finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from care.metrics.equivariance import as_float64, embedding_pair

__all__ = ["ParameterProbe", "parameter_probe"]


@dataclass(frozen=True)
class ParameterProbe:
    """Held-out R² of augmentation-parameter probes, one entry per target (same order as names).

    R² is ``1 - SSE/SST`` on the held-out rows; it can be negative (worse than predicting the
    held-out mean). A target that is constant on the held-out rows has no variance to explain;
    its R² is reported as ``0.0`` (never NaN).
    """

    names: list[str]
    r2_linear: list[float]
    r2_mlp: list[float]

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{name: {"r2_linear": …, "r2_mlp": …}}``."""
        return {
            nm: {"r2_linear": lin, "r2_mlp": mlp}
            for nm, lin, mlp in zip(self.names, self.r2_linear, self.r2_mlp, strict=True)
        }


def _r2(y_true: Tensor, y_pred: Tensor) -> list[float]:
    """Per-column R² = 1 - SSE/SST; columns with (numerically) zero SST give 0.0.

    Finite inputs can still give a non-finite R²: a held-out value far outside a near-constant
    train column standardises past float32's range, and the MLP then predicts NaN. That R² is
    0.0 too, so a result is never NaN.
    """
    centred = y_true - y_true.mean(dim=0, keepdim=True)
    sst = (centred**2).sum(dim=0)
    sse = ((y_true - y_pred) ** 2).sum(dim=0)
    scale = (y_true**2).sum(dim=0)
    out: list[float] = []
    for s_tot, s_err, s_scale in zip(sst.tolist(), sse.tolist(), scale.tolist(), strict=True):
        if s_tot <= 1e-24 * max(s_scale, 1.0):
            out.append(0.0)
        else:
            r2 = 1.0 - s_err / s_tot
            out.append(r2 if math.isfinite(r2) else 0.0)
    return out


def _standardise(train: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Standardise both with the train mean/std (std 0 → 1). Returns (train, other)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (train - mean) / std, (other - mean) / std


def _mlp_predict(
    x_fit: Tensor,
    y_fit: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    x_test: Tensor,
    *,
    hidden: int,
    steps: int,
    lr: float,
    seed: int,
) -> Tensor:
    """Train ``y ≈ W2 relu(W1 x + b1) + b2`` (MSE, full-batch Adam); return test predictions.

    All targets are trained jointly. Early stopping is per target: after every step the
    validation MSE of each target is checked and that target's test prediction is taken from the
    step (0 = initialisation) where its validation MSE was lowest, so a target with no signal is
    not scored on a network that has memorised noise. With no validation rows, the final step is
    used. Weights use PyTorch's default ``nn.Linear`` init drawn from a private generator seeded
    with ``seed``, so the global RNG is untouched.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        return w.to(device=x_fit.device, dtype=x_fit.dtype).requires_grad_(True)

    d_in, d_out = x_fit.shape[1], y_fit.shape[1]
    W1 = uniform((hidden, d_in), d_in)
    b1 = uniform((hidden,), d_in)
    W2 = uniform((d_out, hidden), hidden)
    b2 = uniform((d_out,), hidden)

    def forward(x: Tensor) -> Tensor:
        return torch.relu(x @ W1.T + b1) @ W2.T + b2

    has_val = x_val.shape[0] > 0
    with torch.no_grad():
        best_test = forward(x_test)
        best_val = ((forward(x_val) - y_val) ** 2).mean(dim=0) if has_val else None
    opt = torch.optim.Adam([W1, b1, W2, b2], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((forward(x_fit) - y_fit) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            test = forward(x_test)
            if best_val is None:
                best_test = test
                continue
            val = ((forward(x_val) - y_val) ** 2).mean(dim=0)
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            best_test = torch.where(better[None, :], test, best_test)
    return best_test.detach()


def parameter_probe(
    Z: Tensor,
    Z_a: Tensor,
    targets: Tensor,
    names: list[str],
    *,
    train_fraction: float = 0.8,
    seed: int = 0,
    mlp_hidden: int = 128,
    mlp_steps: int = 500,
    mlp_lr: float = 1e-2,
    mlp_val_fraction: float = 0.2,
    ridge: float = 1e-3,
) -> ParameterProbe:
    """Probe how much of the augmentation's parameters the embedding pair encodes (SIE/AugSelf).

    The input for row ``i`` is ``concat(Z_i, Z_a_i)`` (``2d`` features); ``targets[:, k]`` is the
    ``k``-th recorded parameter of the augmentation applied to row ``i`` (e.g. crop scale, jitter
    strength). An equivariant representation should let a probe recover the parameters; an
    invariant one cannot (``Z_a = Z`` carries no information about ``a``).

    Rows are split into train / held-out by a permutation seeded with ``seed``. Inputs and targets
    are standardised with the train mean and std (a constant train column keeps std 1).

    - Linear probe: closed-form ridge per target (intercept absorbed by centring),
      ``W = (XᵀX / n_train + ridge · I)⁻¹ XᵀY / n_train`` on standardised data.
    - MLP probe: one hidden ReLU layer of ``mlp_hidden`` units, all targets jointly, full-batch Adam
      (``mlp_lr``) for ``mlp_steps`` steps on MSE, initialised from ``seed`` (the global RNG is not
      touched). The last ``mlp_val_fraction`` of the (shuffled) train rows is held back for
      per-target early stopping: each target is predicted by the step with its lowest validation
      MSE, which keeps an uninformative target near R² = 0 instead of rewarding memorised noise.
      Runs in float32 on the inputs' device.

    Returns:
        Held-out R² per target (see :class:`ParameterProbe`; never NaN).

    Raises:
        ValueError: shape mismatch, ``len(names) != k``, a split leaving fewer than 2 train rows
            or no held-out row, or non-finite inputs.
    """
    Z64, Za64 = embedding_pair(Z, Z_a, ("Z", "Z_a"))
    n = Z64.shape[0]
    if not isinstance(targets, Tensor) or targets.ndim not in (1, 2):
        raise ValueError("targets must be a (n,) or (n, k) tensor, one column per parameter")
    T64 = as_float64(targets if targets.ndim == 2 else targets[:, None], "targets", Z64.device)
    if T64.shape[0] != n:
        raise ValueError(f"targets has {T64.shape[0]} rows but Z has {n}; they must match")
    k = T64.shape[1]
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries but targets has {k} columns")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = round(train_fraction * n)
    if n_train < 2 or n - n_train < 1:
        raise ValueError(
            f"train_fraction={train_fraction} with n={n} leaves {n_train} train and "
            f"{n - n_train} held-out rows; need >= 2 and >= 1"
        )
    if mlp_hidden < 1 or mlp_steps < 0:
        raise ValueError("mlp_hidden must be >= 1 and mlp_steps >= 0")
    if not 0.0 <= mlp_val_fraction < 1.0:
        raise ValueError(f"mlp_val_fraction must be in [0, 1), got {mlp_val_fraction}")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(Z64.device)
    tr, te = perm[:n_train], perm[n_train:]
    X = torch.cat([Z64, Za64], dim=1)
    x_tr, x_te = _standardise(X[tr], X[te])
    y_tr, y_te = _standardise(T64[tr], T64[te])

    # Linear: closed-form ridge (standardised, centred data → no intercept needed).
    p = x_tr.shape[1]
    gram = x_tr.T @ x_tr / n_train + ridge * torch.eye(p, dtype=x_tr.dtype, device=x_tr.device)
    W = torch.linalg.solve(gram, x_tr.T @ y_tr / n_train)
    r2_linear = _r2(y_te, x_te @ W)

    # MLP: one hidden ReLU layer, all targets jointly, per-target early stopping on the last
    # `mlp_val_fraction` of the train rows. Must build a graph even if the caller is inside
    # no_grad / inference_mode, and must not use inference tensors.
    n_val = int(mlp_val_fraction * n_train)  # < n_train since mlp_val_fraction < 1
    n_fit = n_train - n_val
    with torch.inference_mode(False), torch.enable_grad():
        xs = x_tr.to(torch.float32).clone()
        ys = y_tr.to(torch.float32).clone()
        pred = _mlp_predict(
            xs[:n_fit],
            ys[:n_fit],
            xs[n_fit:],
            ys[n_fit:],
            x_te.to(torch.float32).clone(),
            hidden=mlp_hidden,
            steps=mlp_steps,
            lr=mlp_lr,
            seed=seed,
        )
    r2_mlp = _r2(y_te, pred.to(torch.float64))
    return ParameterProbe(names=list(names), r2_linear=r2_linear, r2_mlp=r2_mlp)
