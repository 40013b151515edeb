"""Projection heads: Linear (no bias) → BN → ReLU → Linear, then onto the unit sphere or the
hyperboloid (paper, Sec. 3.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional

from care.geometry import lift_to_hyperboloid, soft_clip

EMBEDDINGS = ("sphere", "hyperboloid")

HYPERBOLOID_CLIP_RADIUS = 1.0
"""Radius ``r`` of the soft clip before the hyperboloid lift: ``|u| < r``, so the InfoNCE logits
``-d_L²/2`` lie in ``(-2r², 0]``, the cosine's range (width 2) for ``r = 1``. The clipped ball's
geodesic radius is ``arsinh(√c r)/√c``: raise the curvature ``c`` to make it more hyperbolic."""


class ProjectionHead(nn.Module):
    """SimCLR's head g: Linear(no bias) → BatchNorm → ReLU → Linear(out_dim).

    ``forward`` returns unnormalised projections; ``embed`` maps them onto the sphere S^{d-1}.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = out_dim

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def to_sphere(z: Tensor) -> Tensor:
    """L2-normalise rows: the embedding f(x) on S^{d-1} (paper, Principle 1)."""
    return functional.normalize(z, dim=1)


def to_hyperboloid(
    z: Tensor, curvature: float = 1.0, clip_radius: float = HYPERBOLOID_CLIP_RADIUS
) -> Tensor:
    """Map head outputs ``z ∈ R^d`` onto the hyperboloid of curvature ``-c`` in ``R^{1+d}``.

    ``u = z / √(1 + |z|²/r²)`` (a smooth version of the feature clip of Guo et al., 2022, so an
    unbounded head output cannot blow up distances: ``|u| < r``), then ``x = (√(1/c + |u|²), u)``
    with ``⟨x, x⟩_L = -1/c`` (paper, Sec. 3.2; :func:`care.geometry.lift_to_hyperboloid`).
    Half-precision inputs are lifted in float32, so ``x`` stays on the hyperboloid under autocast.
    """
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return lift_to_hyperboloid(soft_clip(z, clip_radius), curvature)


def embed_projection(
    z: Tensor,
    embedding: str = "sphere",
    curvature: float = 1.0,
    clip_radius: float = HYPERBOLOID_CLIP_RADIUS,
) -> Tensor:
    """The embedding f(x) from head outputs: :func:`to_sphere` (``S^{d-1} ⊂ R^d``) or
    :func:`to_hyperboloid` (``H^d ⊂ R^{1+d}``, one more coordinate) by ``embedding``."""
    if embedding == "sphere":
        return to_sphere(z)
    if embedding == "hyperboloid":
        return to_hyperboloid(z, curvature, clip_radius)
    raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
