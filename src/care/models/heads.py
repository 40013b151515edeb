"""Projection heads: Linear (no bias) → BN → ReLU → Linear, then onto the unit sphere."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional


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
