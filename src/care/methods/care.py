"""CARE (paper, Sec. 3): InfoNCE plus λ·L_equi on group-shared views, and the L_equi + L_unif
ablation (paper, Figure 2)."""

from __future__ import annotations

from torch import Tensor

from care.methods.base import ContrastiveMethod, Views


class CARE(ContrastiveMethod):
    """L_CARE = L_inv + L_unif + λ·L_equi.

    ``views=separate`` (the paper): two per-image views for InfoNCE and two group-shared views
    for L_equi, four backbone passes. ``views=shared``: InfoNCE on the two group-shared views too,
    two passes, so CARE costs what SimCLR costs.
    """

    name = "care"
    uses_groups = True

    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        z1, z2 = self.embed_pair(views.contrastive)
        terms = self.info_nce(z1, z2)
        infonce = terms.total
        if views.shared:
            e1, e2 = z1, z2
        else:  # an independent pair: backpropagate InfoNCE first, freeing its activations
            infonce = self.backward_now(infonce)
            e1, e2 = self.embed_pair(views.group_shared)
        equi = self.equivariance(e1, e2)
        loss = infonce + self.cfg.weight * equi
        return {"loss": loss, "inv": terms.inv.detach(), "unif": terms.unif.detach(), "equi": equi}


class EquiUnif(ContrastiveMethod):
    """The ablation L_unif + λ·L_equi (paper, Figure 2): no invariance term, two group-shared
    views (``views`` does not apply)."""

    name = "equi_unif"
    uses_groups = True

    @property
    def shares_views(self) -> bool:
        return True

    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        e1, e2 = self.embed_pair(views.group_shared)
        unif = self.info_nce(e1, e2).unif
        equi = self.equivariance(e1, e2)
        return {"loss": unif + self.cfg.weight * equi, "unif": unif, "equi": equi}
