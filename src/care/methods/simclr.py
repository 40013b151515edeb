"""SimCLR (Chen et al., 2020): InfoNCE on two independently augmented views."""

from __future__ import annotations

import torch
from torch import Tensor

from care.augment import AugParams
from care.methods.base import ContrastiveMethod


class SimCLR(ContrastiveMethod):
    """L_InfoNCE = L_inv + L_unif on two views, each augmented per image."""

    name = "simclr"

    def sample_views(self, n: int, generator: torch.Generator) -> list[AugParams]:
        return [self.augmenter.sample(n, generator) for _ in range(2)]

    def compute_loss(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        terms = self.contrastive_terms(embeddings[0], embeddings[1])
        return {"loss": terms.total, "inv": terms.inv, "unif": terms.unif}
