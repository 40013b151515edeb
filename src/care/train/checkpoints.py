"""``checkpoints/last.ckpt``: when it is written, stopping on a signal, and resuming on many nodes.

:class:`LastCheckpoint` writes ``last.ckpt`` at every epoch end, every ``checkpoint_every_steps``
steps, and after the step during which a stop signal arrived (:mod:`care.train.signals`); the
run then stops with :class:`care.errors.RunInterrupted`. A checkpoint holds the model, optimiser,
schedule and MoCo queue, Lightning's loop counters and the training loader's position within the
epoch (:class:`care.data.ResumableLoader`); the augmentations are seeded by (seed, step, rank).
So ``resume=true`` continues with the next batch of the same order and the same augmentations,
and ends with the weights of an uninterrupted run.

:class:`SameCheckpointOnEveryRank` refuses a resume in which the ranks do not all read the
checkpoint rank 0 resumes from (nodes that do not share the run's filesystem).
"""

from __future__ import annotations

import hashlib
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from care.data import ResumableLoader
from care.distributed import any_rank, host_group, is_distributed
from care.errors import CareError, RunInterrupted
from care.train.signals import StopSignals


class LastCheckpoint(Callback):
    """Writes ``path`` at epoch ends, every ``every_steps`` steps (0: never mid-epoch) and on a
    stop signal, after which it raises :class:`RunInterrupted` on every rank.

    The ranks agree on stopping after each step with one all-reduce on the CPU (gloo), which
    does not wait for the accelerator. A signal during an epoch's last step stops the run at
    the epoch's end, after the online kNN monitor.
    """

    def __init__(
        self,
        path: Path,
        every_steps: int = 0,
        before_message: Callable[[], None] | None = None,
    ) -> None:
        self.path, self.every_steps = Path(path), every_steps
        # before_message ends the progress line, so that "SIGTERM received" starts a line
        self.signals = StopSignals(before_message)
        self._group: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_distributed():
            self._group = host_group()  # a collective: every rank makes it here
        if trainer.received_sigterm:  # arrived while Lightning set up, under its own handler
            self.signals.received = signal.SIGTERM
        self.signals.install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signals.restore()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            return  # the epoch's end writes the checkpoint (and stops, if asked to)
        if self._stop_requested():
            self._save(trainer)
            self._stop(trainer)
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
        if self._stop_requested():
            self._stop(trainer)

    def _stop_requested(self) -> bool:
        return any_rank(self.signals.received is not None, group=self._group)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes, atomically

    def _stop(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            self.signals.requeue_if_slurm()
        signum = self.signals.received or signal.SIGTERM  # a rank told by another rank
        epoch = trainer.current_epoch + 1  # counted from 1, as the progress line counts
        raise RunInterrupted(trainer.global_step, epoch, signum, trainer.max_epochs)


class LoaderPosition(Callback):
    """Keeps the training loader's position within the epoch in every checkpoint and gives it
    back on resume, before the first batch is drawn.

    Lightning saves a stateful loader's state itself, but restores it only if the loader is
    built after the checkpoint is read; the lr schedule's ``estimated_stepping_batches`` builds
    it before. Callback states are restored first, so the position travels here.
    """

    def __init__(self) -> None:
        self.loader: ResumableLoader | None = None  # set once the rank's loader exists

    def state_dict(self) -> dict[str, Any]:
        return {} if self.loader is None else self.loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.loader is None:
            raise RuntimeError("LoaderPosition.loader must be set before the fit starts")
        if state_dict:
            self.loader.load_state_dict(state_dict)


def file_digest(path: Path) -> str | None:
    """BLAKE2b of a file's bytes, or None when this process cannot read it."""
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "blake2b").hexdigest()
    except OSError:
        return None


class SameCheckpointOnEveryRank(Callback):
    """Before a resumed run restores its state, check that every rank reads the same
    ``resume_from`` (by content) as rank 0, and refuse with one line naming a rank that does
    not: a node that does not see the run's folder, or sees another copy of it, would start
    from other weights than the rest and hang or diverge."""

    def __init__(self, resume_from: Path | None, out: Path) -> None:
        self.resume_from, self.out = resume_from, out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not is_distributed():
            return
        mine = file_digest(self.resume_from) if self.resume_from is not None else None
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (mine, socket.gethostname()), group=host_group())
        problem = checkpoint_mismatch(seen, self.out)
        if problem:
            raise CareError(problem)


def checkpoint_mismatch(seen: list[tuple[str | None, str]], out: Path) -> str | None:
    """The one-line refusal for ranks whose checkpoint (digest, host) differs from rank 0's."""
    reference = seen[0][0]
    for rank, (digest, host) in enumerate(seen):
        if digest == reference:
            continue
        last = out / "checkpoints" / "last.ckpt"
        if reference is None:
            what = f"finds {last}, but rank 0 does not and would start a new run"
        elif digest is None:
            what = f"cannot read {last}, which rank 0 resumes from"
        else:
            what = f"reads another {last} than rank 0 (a node-local copy?)"
        return (
            f"rank {rank} on host {host} {what}: put out= on a filesystem that every node "
            "shares (docs/distributed.md)"
        )
    return None
