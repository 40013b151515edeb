"""The one base method: encoder f = sphere ∘ head ∘ backbone, batched augmentation, optimiser.

A method only chooses its views (:meth:`ContrastiveMethod.sample_views`) and its loss
(:meth:`ContrastiveMethod.compute_loss`); the base class augments all views in one go, embeds them
in one forward pass, checks the loss, logs it and builds the optimiser and schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from care.augment import Augmenter, AugmentRecipe, AugParams
from care.augment.eval import eval_transform
from care.config import Config
from care.distributed import any_rank, gather_with_grad, rank_and_world
from care.errors import CareError
from care.losses import InfoNCETerms, equivariance_loss, info_nce_terms
from care.models import ProjectionHead, ResNet, embed_projection


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    eval_crop_fraction: float = 1.0


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the augmentation generator for one (seed, step, rank): reproducible and resumable."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1)


class ContrastiveMethod(L.LightningModule):
    """Base LightningModule of every method. Subclasses set ``name`` and implement two hooks."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: Config, data: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.backbone = ResNet(
            cfg.backbone, in_channels=data.channels, stem=cfg.stem, widths=cfg.widths
        )
        self.head = ProjectionHead(self.backbone.feature_dim, cfg.head_hidden, cfg.head_out)
        recipe = AugmentRecipe.for_channels(data.channels, crop_scale=(cfg.crop_min_scale, 1.0))
        self.augmenter = Augmenter(recipe, data.image_size, data.mean, data.std)

    # ----------------------------------------------------------------- hooks
    def sample_views(self, n: int, generator: torch.Generator) -> list[AugParams]:
        """Augmentation records of every view of a batch of ``n`` images."""
        raise NotImplementedError

    def compute_loss(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        """Loss terms from the views' embeddings (same order as ``sample_views``); key ``loss``."""
        raise NotImplementedError

    # ----------------------------------------------------------- the encoder
    def embed(self, x: Tensor) -> Tensor:
        """f(x): the backbone features' projection on the unit sphere, or lifted onto the
        hyperboloid of curvature ``-c`` (``cfg.embedding``, ``cfg.curvature``; paper, Sec. 3.2)."""
        return embed_projection(self.head(self.backbone(x)), self.cfg.embedding, self.cfg.curvature)

    # ------------------------------------------------- the losses' geometry
    def contrastive_terms(self, z1: Tensor, z2: Tensor) -> InfoNCETerms:
        """InfoNCE of two views (paper, Eq. 1). Under DDP each local anchor is compared with both
        views of every rank's samples, gathered with gradients (:mod:`care.distributed`). On the
        hyperboloid the similarity is ``-d_L²/2`` (:func:`care.losses.info_nce_terms`)."""
        rank, _ = rank_and_world()
        c1, c2 = gather_with_grad(z1), gather_with_grad(z2)
        return info_nce_terms(
            z1,
            z2,
            self.cfg.temperature,
            candidates1=c1,
            candidates2=c2,
            offset=rank * z1.shape[0],
            similarity="lorentz" if self.cfg.embedding == "hyperboloid" else "dot",
            curvature=self.cfg.curvature,
        )

    def equivariance(self, e1: Tensor, e2: Tensor) -> Tensor:
        """L_equi (paper, Eq. 3) of two group-shared views under the bilinear form ``cfg.form``
        (paper, Sec. 3.2); groups never span ranks."""
        return equivariance_loss(e1, e2, self.cfg.group_size, form=self.cfg.form)

    def step_generator(self) -> torch.Generator:
        """CPU generator for this step's augmentation, seeded by (seed, step, rank)."""
        gen = torch.Generator()
        gen.manual_seed(step_seed(self.cfg.seed, self.global_step, self.global_rank))
        return gen

    def augment_views(self, images: Tensor, params: list[AugParams]) -> list[Tensor]:
        """The views, stacked two at a time (the pair that one loss term compares)."""
        views = [self.augmenter.apply(images, p) for p in params]
        return [torch.cat(views[i : i + 2]) for i in range(0, len(views), 2)]

    def forward_views(self, stacks: list[Tensor], batch_size: int) -> list[Tensor]:
        """Embed each stack in one forward pass (BatchNorm statistics over the pair of views)."""
        embeddings: list[Tensor] = []
        for stack in stacks:
            z = self.embed(stack)  # the losses compute half precision in float32
            embeddings.extend(z.split(batch_size))
        return embeddings

    def embed_views(self, stacks: list[Tensor], batch_size: int) -> list[Tensor]:
        """Every embedding ``compute_loss`` takes (hook; MoCo adds its momentum keys)."""
        return self.forward_views(stacks, batch_size)

    def after_loss(self, embeddings: list[Tensor]) -> None:
        """Bookkeeping once the step's loss is computed (hook; MoCo enqueues its keys)."""

    # -------------------------------------------------------------- training
    def loss_from_views(self, stacks: list[Tensor], batch_size: int) -> dict[str, Tensor]:
        """Loss terms of already augmented views (stacked in pairs, as ``augment_views`` returns)."""
        embeddings = self.embed_views(stacks, batch_size)
        losses = self.compute_loss(embeddings)
        self.after_loss(embeddings)
        return losses

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        n = images.shape[0]
        params = self.sample_views(n, self.step_generator())
        losses = self.loss_from_views(self.augment_views(images, params), n)
        loss = losses["loss"]
        if any_rank(not bool(torch.isfinite(loss))):  # collective: every rank stops together
            raise CareError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}):"
                " lower lr, raise temperature or use precision=32"
            )
        for key, value in losses.items():
            self.log(
                f"train/{key}",
                value.detach(),
                prog_bar=key == "loss",
                on_step=True,
                on_epoch=False,
                batch_size=images.shape[0],
                sync_dist=True,
            )
        self.log(
            "train/lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            on_step=True,
            on_epoch=False,
            batch_size=images.shape[0],
        )
        return loss

    def validation_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Backbone features of un-augmented images, for the online kNN monitor."""
        images, labels = batch
        x = eval_transform(
            images,
            self.data.image_size,
            self.data.mean,
            self.data.std,
            self.data.eval_crop_fraction,
        )
        return {"features": self.backbone(x).float(), "labels": labels}

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(cfg.warmup_epochs * total / cfg.epochs)
        schedule = WarmupCosine(total, warmup, cosine=cfg.scheduler == "cosine")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class WarmupCosine:
    """Multiplier of the base lr per step: linear warm-up to 1, then cosine decay to 0 (or flat).

    A plain object, so LambdaLR's state dict holds only numbers (checkpoints load weights-only).
    """

    def __init__(self, total: int, warmup: int, cosine: bool) -> None:
        self.total, self.warmup, self.cosine = total, warmup, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
