"""SimCLR (Chen et al., 2020): InfoNCE on two independently augmented views."""

from __future__ import annotations

from torch import Tensor

from care.methods.base import ContrastiveMethod, Views


class SimCLR(ContrastiveMethod):
    """L_InfoNCE = L_inv + L_unif on two views, each augmented per image."""

    name = "simclr"

    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        z1, z2 = self.embed_pair(views.contrastive)
        terms = self.info_nce(z1, z2)
        return {"loss": terms.total, "inv": terms.inv, "unif": terms.unif}
