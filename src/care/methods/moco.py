"""MoCo-v2 (Chen et al., 2020) and CARE on MoCo-v2 (paper, Sec. 4, "CARE_MoCo-v2").

The key encoder is a momentum (EMA) copy of the backbone and head; negatives come from a queue of
past keys. The loss is symmetrised: each view is a query for the other view's key, as in
solo-learn and MoCo v3, so every image contributes two query terms per step. Under DDP the queue is
fed with the keys of every rank, and BatchNorm is per device unless ``sync_batchnorm=true``
(SyncBN, as MoCo v3 does, instead of MoCo v1/v2's shuffle-BN).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from care.config import Config
from care.data import DataInfo
from care.distributed import gather_no_grad
from care.errors import CareError
from care.losses import InfoNCETerms, moco_terms
from care.methods.base import ContrastiveMethod, ViewPair, Views, embed_both
from care.models import to_sphere


class KeyQueue(nn.Module):
    """A first-in-first-out ring of the last ``size`` keys (rows), kept in buffers so that
    checkpoints hold it and a resumed run continues with the same negatives.

    It starts filled with random unit vectors, as in the official MoCo code. :meth:`push` writes a
    batch over the oldest entries, wrapping around the end of the buffer.
    """

    keys: Tensor
    pointer: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("keys", to_sphere(torch.randn(size, dim, generator=generator)))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Overwrite the oldest ``len(keys)`` entries (only the newest ``size`` if more)."""
        keys = keys.detach().to(self.keys.dtype)[-self.size :]
        # The pointer stays on the device: no host sync.
        rows = (torch.arange(keys.shape[0], device=self.keys.device) + self.pointer) % self.size
        self.keys.index_copy_(0, rows, keys)
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.size)

    def oldest_first(self) -> Tensor:
        """The keys from oldest to newest (for inspection and tests)."""
        return torch.roll(self.keys, -int(self.pointer), dims=0)


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """θ_k ← m·θ_k + (1 − m)·θ_q for every parameter (He et al., 2020, Eq. 2)."""
    for k, q in zip(key.parameters(), query.parameters(), strict=True):
        k.mul_(momentum).add_(q.detach(), alpha=1.0 - momentum)


class MoCo(ContrastiveMethod):
    """L = ½ [ℓ(q₁, k₂, queue) + ℓ(q₂, k₁, queue)], with ℓ MoCo's InfoNCE (:func:`moco_terms`)."""

    name = "moco"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.embedding != "sphere":
            raise CareError(
                f"method={cfg.method} supports embedding=sphere only (its queue holds unit "
                "vectors): set embedding=sphere or use method=care"
            )

    def __init__(self, cfg: Config, data: DataInfo) -> None:
        super().__init__(cfg, data)
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.queue = KeyQueue(cfg.queue_size, cfg.head_out, generator)

    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        q1, q2 = self.embed_pair(views.contrastive)
        k1, k2 = self.momentum_keys(views.contrastive)
        terms = self.symmetric_moco(q1, q2, k1, k2)
        self.queue.push(gather_no_grad(k2))  # from every rank, once they served as positives
        return {"loss": terms.total, "inv": terms.inv, "unif": terms.unif}

    @torch.no_grad()
    def momentum_keys(self, pair: ViewPair) -> tuple[Tensor, Tensor]:
        """Keys of both views from the key encoder, without gradient, after its EMA step
        θ_k ← m·θ_k + (1 − m)·θ_q. As in the official code, the keys come from the EMA of the
        query encoder as it stands after the previous optimiser step."""
        momentum_update(self.key_encoder, self.encoder, self.cfg.moco_momentum)
        return embed_both(self.key_encoder, pair)

    def symmetric_moco(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> InfoNCETerms:
        """Each view's queries against the other view's keys and the queue, averaged."""
        queue = self.queue.keys.clone()  # the queue changes after this step
        a = moco_terms(q1, k2, queue, self.cfg.temperature)
        b = moco_terms(q2, k1, queue, self.cfg.temperature)
        return InfoNCETerms(inv=(a.inv + b.inv) / 2, unif=(a.unif + b.unif) / 2)


class CAREMoCo(MoCo):
    """CARE_MoCo-v2: MoCo's loss plus λ·L_equi on the query encoder's embeddings of the
    group-shared views (``views=separate``: 2 extra views; ``views=shared``: the MoCo views
    themselves are group-shared)."""

    name = "care_moco"
    uses_groups = True

    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        q1, q2 = self.embed_pair(views.contrastive)
        k1, k2 = self.momentum_keys(views.contrastive)
        terms = self.symmetric_moco(q1, q2, k1, k2)
        self.queue.push(gather_no_grad(k2))
        moco = terms.total
        if views.shared:
            e1, e2 = q1, q2
        else:  # an independent pair: backpropagate MoCo's loss first, freeing its activations
            moco = self.backward_now(moco)
            e1, e2 = self.embed_pair(views.group_shared)
        equi = self.equivariance(e1, e2)
        loss = moco + self.cfg.weight * equi
        return {"loss": loss, "inv": terms.inv.detach(), "unif": terms.unif.detach(), "equi": equi}
