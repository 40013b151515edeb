"""CARE (paper, Sec. 3): InfoNCE plus λ·L_equi on group-shared views, and the L_equi + L_unif
ablation (paper, Figure 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from care.augment import AugParams
from care.methods.base import ContrastiveMethod


class CARE(ContrastiveMethod):
    """L_CARE = L_inv + L_unif + λ·L_equi.

    ``views=separate`` (the paper): two per-image views for InfoNCE and two group-shared views
    for L_equi, four backbone passes. ``views=shared``: InfoNCE on the two group-shared views too,
    two passes, so CARE costs what SimCLR costs.
    """

    name = "care"

    def sample_group_pair(self, n: int, generator: torch.Generator) -> list[AugParams]:
        """Two views in which each group of ``group_size`` images shares its augmentation."""
        cfg = self.cfg
        return [
            self.augmenter.sample(n, generator, group_size=cfg.group_size, pairs=cfg.pairs)
            for _ in range(2)
        ]

    def sample_views(self, n: int, generator: torch.Generator) -> list[AugParams]:
        grouped = self.sample_group_pair(n, generator)
        if self.cfg.views == "shared":
            return grouped
        return [self.augmenter.sample(n, generator) for _ in range(2)] + grouped

    def compute_loss(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        terms = self.contrastive_terms(embeddings[0], embeddings[1])
        equi = self.equivariance(embeddings[-2], embeddings[-1])
        loss = terms.total + self.cfg.weight * equi
        return {"loss": loss, "inv": terms.inv, "unif": terms.unif, "equi": equi}


class EquiUnif(CARE):
    """The ablation L_unif + λ·L_equi (paper, Figure 2): no invariance term, two shared views."""

    name = "equi_unif"

    def sample_views(self, n: int, generator: torch.Generator) -> list[AugParams]:
        return self.sample_group_pair(n, generator)

    def compute_loss(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        terms = self.contrastive_terms(embeddings[0], embeddings[1])
        equi = self.equivariance(embeddings[0], embeddings[1])
        return {"loss": terms.unif + self.cfg.weight * equi, "unif": terms.unif, "equi": equi}
