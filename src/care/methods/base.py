"""What every method shares: the encoder, the views of a step, the losses' geometry, the optimiser.

One training step (:meth:`ContrastiveMethod.training_step`) draws this step's augmentations,
applies them (:meth:`~ContrastiveMethod.make_views`, which returns the views by role as
:class:`Views`), hands them to the method's own :meth:`~ContrastiveMethod.compute_losses`, which
reads top to bottom (embed the views, compute the loss terms), then backpropagates, steps the
optimiser and logs. A method is one small class that sets ``name`` and ``uses_groups`` and writes
``compute_losses``; the registry in :mod:`care.methods` maps its name to it.

The InfoNCE pair and the group-shared pair of ``views=separate`` are independent graphs. A method
hands the first pair's loss to :meth:`~ContrastiveMethod.backward_now` before it embeds the
second pair, so a step holds two views' activations at a time, not four; the gradients are those
of the whole loss (DDP averages them once, in the step's last backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn

from care.augment import AugParams, build_augmenter
from care.augment.eval import eval_transform
from care.config import Config
from care.data import DataInfo
from care.distributed import any_rank, gather_with_grad, rank_and_world
from care.errors import CareError
from care.hardware import resolve, torch_memory_format
from care.losses import InfoNCETerms, equivariance_loss, info_nce_terms
from care.methods.optim import build_optimizer
from care.models import build_encoder
from care.runs import RunDir, StoredTensor, state_mismatch

SCHEDULERS = ("cosine", "constant")

#: Where care 0.1 checkpoints kept the weights that now live in ``encoder`` and ``key_encoder``.
_V01_PREFIXES = {
    "backbone.": "encoder.backbone.",
    "head.": "encoder.head.",
    "key_backbone.": "key_encoder.backbone.",
    "key_head.": "key_encoder.head.",
}


class ViewPair(NamedTuple):
    """Two augmented views of the same images, ``(B, C, H, W)`` each, row ``i`` of both from
    image ``i``."""

    first: Tensor
    second: Tensor


@dataclass(frozen=True)
class Views:
    """The augmented images of one training step, by the role they play in the loss.

    ``contrastive`` is InfoNCE's pair (SimCLR, MoCo: queries and keys come from it).
    ``grouped`` is L_equi's group-shared pair: the ``group_size`` consecutive images of a group
    share one augmentation in ``first`` and another in ``second`` (paper, Algorithm 1); it is
    ``None`` for methods without L_equi, and the very object ``contrastive`` is when InfoNCE is
    computed on the group-shared views (``views=shared``).
    """

    contrastive: ViewPair
    grouped: ViewPair | None = None

    @property
    def shared(self) -> bool:
        """True when InfoNCE and L_equi see the same pair of views."""
        return self.grouped is self.contrastive

    @property
    def group_shared(self) -> ViewPair:
        """The group-shared pair; a method with L_equi needs it."""
        if self.grouped is None:
            raise ValueError("these views have no group-shared pair: L_equi needs one")
        return self.grouped


def embed_both(encoder: nn.Module, pair: ViewPair) -> tuple[Tensor, Tensor]:
    """``encoder`` on both views in one forward pass (BatchNorm statistics over the pair)."""
    z1, z2 = encoder(torch.cat(pair)).split(pair.first.shape[0])
    return z1, z2


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the augmentation generator for one (seed, step, rank): reproducible and resumable."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1)


class ContrastiveMethod(L.LightningModule):
    """Base LightningModule of every method. A subclass sets ``name`` (its config value),
    ``uses_groups`` (whether its loss has L_equi) and implements :meth:`compute_losses`."""

    name: ClassVar[str] = ""
    uses_groups: ClassVar[bool] = False
    """Whether the loss includes L_equi, which needs group-shared views (``group_size``)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise :class:`CareError` (one line) if ``cfg`` cannot train this method."""
        if not cls.uses_groups:
            return
        if cfg.group_size < 2:
            raise CareError(
                f"bad value for 'group_size': {cfg.group_size}; L_equi needs groups of at least 2"
            )
        if cfg.batch_size % cfg.group_size != 0:
            raise CareError(
                f"batch_size={cfg.batch_size} does not split into groups of "
                f"group_size={cfg.group_size}: choose a batch_size that is a multiple of group_size"
            )

    def __init__(self, cfg: Config, data: DataInfo) -> None:
        type(self).check_config(cfg)
        super().__init__()
        # The step backpropagates each independent pair of views on its own (backward_now).
        self.automatic_optimization = False
        self.cfg = cfg = resolve(cfg)
        self.data = data
        self.memory_format = torch_memory_format(cfg.memory_format)
        self.encoder = build_encoder(cfg, data.channels)
        self.encoder.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.augmenter = build_augmenter(cfg, data)
        self._early_backward: Callable[[Tensor], None] | None = None
        self._first_nonfinite: Tensor | None = None  # on the device: the step, or -1
        self._nonfinite_loss = torch.zeros(())  # on the device: that step's loss

    # ------------------------------------------------------------- the step
    def compute_losses(self, views: Views) -> dict[str, Tensor]:
        """The loss terms of one step's views; ``loss`` is the one to minimise."""
        raise NotImplementedError

    @property
    def shares_views(self) -> bool:
        """Whether InfoNCE uses the group-shared views (``views=shared``)."""
        return self.cfg.views == "shared"

    def make_views(self, images: Tensor, generator: torch.Generator) -> Views:
        """This step's views, drawn from ``generator`` and applied on the images' device.

        InfoNCE's pair has independent augmentations per image. A method with L_equi also gets
        the group-shared pair, which is InfoNCE's pair too when :attr:`shares_views` (two
        backbone passes per step) and otherwise comes on top of it (four, as in the paper).
        """
        n = images.shape[0]
        sample = self.augmenter.sample
        if not self.uses_groups:
            return Views(self.augment(images, sample(n, generator), sample(n, generator)))
        cfg = self.cfg
        grouped = self.augment(
            images,
            sample(n, generator, group_size=cfg.group_size, pairs=cfg.pairs),
            sample(n, generator, group_size=cfg.group_size, pairs=cfg.pairs),
        )
        if self.shares_views:
            return Views(contrastive=grouped, grouped=grouped)
        contrastive = self.augment(images, sample(n, generator), sample(n, generator))
        return Views(contrastive=contrastive, grouped=grouped)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        assert isinstance(optimizer, L.pytorch.core.optimizer.LightningOptimizer)
        optimizer.zero_grad(set_to_none=False)  # the gradients stay where on_train_start put them
        views = self.make_views(images, self.step_generator())

        def backward_without_sync(part: Tensor) -> None:
            with optimizer.toggle_model(sync_grad=False):  # DDP syncs in the last backward
                self.manual_backward(part)

        with self.early_backward(backward_without_sync):
            losses = self.compute_losses(views)
        loss = losses["loss"]
        self.manual_backward(loss)
        optimizer.step()
        scheduler.step()  # type: ignore[union-attr]

        self.record_nonfinite(loss)
        last_of_epoch = batch_idx + 1 == self.trainer.num_training_batches
        if (self.global_step % self.cfg.log_every == 0) or last_of_epoch:
            self.stop_if_nonfinite()  # host sync and collective, on logging steps only
            self.log_losses(losses, images.shape[0])
        return loss.detach()

    def on_train_start(self) -> None:
        """Allocate the gradients once, before any activation, and keep them for the run.

        Gradients allocated during each step's first backward land amid the activations being
        freed; on the CPU, glibc then cannot fit the next pair's activations in the holes they
        leave and grows the heap: care with separate views peaked 1.11× SimCLR's RSS that way,
        and 1.02× with the gradients allocated here (docs/benchmarks.md).
        """
        for p in self.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    @contextmanager
    def early_backward(self, backward: Callable[[Tensor], None]) -> Iterator[None]:
        """Within this block, :meth:`backward_now` runs ``backward`` on the parts it is given
        (outside it, they stay in the graph of the returned loss: one backward for the step)."""
        previous, self._early_backward = self._early_backward, backward
        try:
            yield
        finally:
            self._early_backward = previous

    def backward_now(self, part: Tensor) -> Tensor:
        """Backpropagate ``part`` of the loss now and return it detached, so that its views'
        activations are freed before the next pair is embedded; the gradients add up to those of
        the whole loss. Outside :meth:`early_backward`, ``part`` is returned as is."""
        if self._early_backward is None:
            return part
        self._early_backward(part)
        return part.detach()

    def record_nonfinite(self, loss: Tensor) -> None:
        """Remember, on the device and without a host sync, the first step whose loss is not
        finite, and that loss."""
        loss = loss.detach().float()
        if self._first_nonfinite is None or self._first_nonfinite.device != loss.device:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._nonfinite_loss = torch.zeros((), device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_nonfinite < 0)
        step = torch.full_like(self._first_nonfinite, self.global_step - 1)
        self._first_nonfinite = torch.where(bad, step, self._first_nonfinite)
        self._nonfinite_loss = torch.where(bad, loss, self._nonfinite_loss)

    def stop_if_nonfinite(self) -> None:
        """Raise :class:`CareError` on every rank if any rank's loss was not finite since the
        start (read from the device flag of :meth:`record_nonfinite`: one host sync)."""
        first, value = -1, float("nan")
        if self._first_nonfinite is not None:
            first, value = int(self._first_nonfinite), float(self._nonfinite_loss)
        if any_rank(first >= 0):  # collective: every rank stops together
            what = f"{value} at step {first}" if first >= 0 else "non-finite on another rank"
            raise CareError(
                f"loss became {what} (epoch {self.current_epoch}):"
                " lower lr, raise temperature or use precision=32"
            )

    def log_losses(self, losses: dict[str, Tensor], batch_size: int) -> None:
        """Log the loss terms (averaged over ranks) and the lr, on logging steps."""
        for key, value in losses.items():
            self.log(
                f"train/{key}",
                value.detach(),
                prog_bar=key == "loss",
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
                sync_dist=True,
            )
        self.log(
            "train/lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )

    # ------------------------------------------------ what the steps share
    def step_generator(self) -> torch.Generator:
        """CPU generator for this step's augmentation, seeded by (seed, step, rank)."""
        gen = torch.Generator()
        gen.manual_seed(step_seed(self.cfg.seed, self.global_step, self.global_rank))
        return gen

    def augment(self, images: Tensor, first: AugParams, second: AugParams) -> ViewPair:
        """The two views of ``images`` under two parameter records, in the encoder's memory
        format."""
        first_view = self.augmenter.apply(images, first)
        second_view = self.augmenter.apply(images, second)
        return ViewPair(
            first_view.contiguous(memory_format=self.memory_format),
            second_view.contiguous(memory_format=self.memory_format),
        )

    def embed_pair(self, pair: ViewPair) -> tuple[Tensor, Tensor]:
        """f of both views, with gradient (:func:`embed_both`)."""
        return embed_both(self.encoder, pair)

    def info_nce(self, z1: Tensor, z2: Tensor) -> InfoNCETerms:
        """InfoNCE of two views (paper, Eq. 1). Under DDP each local anchor is compared with both
        views of every rank's samples, gathered with gradients (:mod:`care.distributed`). On the
        hyperboloid the similarity is ``-d_L²/2`` (:func:`care.losses.info_nce_terms`)."""
        rank, _ = rank_and_world()
        return info_nce_terms(
            z1,
            z2,
            self.cfg.temperature,
            candidates1=gather_with_grad(z1),
            candidates2=gather_with_grad(z2),
            offset=rank * z1.shape[0],
            similarity="lorentz" if self.cfg.embedding == "hyperboloid" else "dot",
            curvature=self.cfg.curvature,
        )

    def equivariance(self, e1: Tensor, e2: Tensor) -> Tensor:
        """L_equi (paper, Eq. 3) of the group-shared pair under the bilinear form ``cfg.form``
        (paper, Sec. 3.2); groups never span ranks."""
        return equivariance_loss(e1, e2, self.cfg.group_size, form=self.cfg.form)

    # ------------------------------------------------------ online monitor
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
        ).contiguous(memory_format=self.memory_format)
        return {"features": self.encoder.backbone(x).float(), "labels": labels}

    # ---------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume care 0.1 checkpoints too, which kept the encoder's parts at the top level;
        refuse a state dict that does not fit this model (:meth:`check_checkpoint_state`); plan
        the lr schedule for this config's ``epochs`` (:meth:`replan_schedule`)."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            raise CareError(
                f"checkpoint {self._checkpoint_file} holds no model weights ('state_dict'): delete "
                "it to start afresh, or put back the run's own checkpoint"
            )
        renamed = {}
        for key, value in state.items():
            old = next((p for p in _V01_PREFIXES if str(key).startswith(p)), None)
            renamed[key if old is None else _V01_PREFIXES[old] + key[len(old) :]] = value
        checkpoint["state_dict"] = renamed
        self.check_checkpoint_state(renamed)
        self.replan_schedule(checkpoint)

    @property
    def _checkpoint_file(self) -> Path:
        """The checkpoint being restored: the one the trainer was given (``ckpt_path``), else
        ``checkpoints/last.ckpt`` in the run's folder, which a resumed run reads."""
        given = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return Path(given) if given else RunDir(self.cfg.out).last_checkpoint

    def check_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Refuse, in one line naming the checkpoint, a state dict whose names or shapes (or
        float and integer dtypes) are not this model's (:func:`care.runs.state_mismatch`):
        a checkpoint of another model, or a config changed since it was written."""
        stored = {}
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise CareError(
                    f"checkpoint {self._checkpoint_file} holds {name!r}, which is not a tensor, in "
                    "its weights: delete it to start afresh, or put back the run's own checkpoint"
                )
            stored[str(name)] = StoredTensor.of(tensor)
        problem = state_mismatch(stored, self.state_dict())
        if problem is not None:
            raise CareError(
                f"checkpoint {self._checkpoint_file} does not match the model of this config: "
                f"{problem}; resume with the settings it was trained with, or delete it to start "
                "afresh"
            )

    def replan_schedule(self, checkpoint: dict[str, Any]) -> None:
        """A run resumed with more ``epochs`` follows the schedule of a run planned for them.

        LambdaLR would restore the saved :class:`WarmupCosine` (its total steps) and keep the old
        plan, so added epochs would train at lr 0 after its end; here the saved plan is dropped,
        and the step counter alone is restored: the lr at each step is that of a run with the new
        ``epochs`` from the start (a finished cosine run restarts at that schedule's lr for its
        step, a warm restart). Fewer epochs than the run has started is refused in one line.
        """
        started = int(checkpoint.get("epoch", 0)) + 1  # epochs begun (the last may be partial)
        if self.cfg.epochs < started:
            raise CareError(
                f"the run being resumed has trained {started} epoch(s); epochs={self.cfg.epochs} "
                f"would undo them: pass epochs={started} or more (more epochs extend the run)"
            )
        for scheduler in checkpoint.get("lr_schedulers", []):
            if "lr_lambdas" in scheduler:
                scheduler["lr_lambdas"] = [None] * len(scheduler["lr_lambdas"])

    # ------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        optimizer = build_optimizer(self, cfg, self.device)
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
