"""The Lightning callbacks of a pretraining: the online kNN monitor, metrics.csv, step time and
the progress a person reads."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar

from care.data import unshard
from care.metrics import weighted_knn_accuracy
from care.progress import clock_text
from care.runs import atomic_write_text


class KNNMonitor(Callback):
    """Online weighted-kNN accuracy of backbone features, once per validation epoch, logged as
    ``val/knn_acc`` in percent (as ``care probe`` reports it).

    Validation loader 0 is the labelled bank (training images), loader 1 the test split. On
    several processes each rank embeds its
    :class:`care.data.ShardSampler` shard of both; the shards are all-gathered and put back in
    dataset order, so every rank computes the single-process accuracy. ``bank_size`` and
    ``test_size`` are the images of the last check.
    """

    def __init__(self, num_classes: int, k: int, temperature: float) -> None:
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.outputs: dict[int, list[dict[str, torch.Tensor]]] = {0: [], 1: []}
        self.bank_size: int | None = None
        self.test_size: int | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.outputs = {0: [], 1: []}

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.outputs[dataloader_idx].append(outputs)

    def gathered(self, pl_module: L.LightningModule, loader: int) -> dict[str, torch.Tensor]:
        """Features and labels of every image of ``loader``, in dataset order, on every rank."""
        mine = {k: torch.cat([o[k] for o in self.outputs[loader]]) for k in ("features", "labels")}
        trainer = pl_module.trainer
        if trainer.world_size == 1:
            return mine
        loaders = trainer.val_dataloaders
        assert isinstance(loaders, list)
        size = len(loaders[loader].dataset)
        gathered = {k: pl_module.all_gather(v) for k, v in mine.items()}
        return {k: unshard(v, size) for k, v in gathered.items() if isinstance(v, torch.Tensor)}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.outputs[0] or not self.outputs[1]:
            return
        bank, test = self.gathered(pl_module, 0), self.gathered(pl_module, 1)
        accuracy = weighted_knn_accuracy(
            bank["features"],
            bank["labels"],
            test["features"],
            test["labels"],
            self.num_classes,
            self.k,
            self.temperature,
        )
        self.bank_size, self.test_size = len(bank["labels"]), len(test["labels"])
        # Every rank computed it from all the features, so the value is the same on all of them.
        pl_module.log("val/knn_acc", 100.0 * accuracy, sync_dist=True)
        self.outputs = {0: [], 1: []}


class MetricsCSV(Callback):
    """``metrics.csv``: one row per logged step (every ``every`` steps and each epoch's last), and
    one per validation, rewritten atomically at each epoch's end, so every epoch has a loss row.

    Each row has ``time_s``: the seconds spent training up to it, validation (the kNN monitor)
    excluded, so methods compare per second of training whatever the monitor costs. A resumed run
    counts on from its last kept row. On resume, rows past the restored step (from the killed
    attempt) are dropped.
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.rows: list[dict[str, Any]] = []
        self.writer = True  # rank 0 alone writes (set at fit start)
        self.clock_offset = 0.0  # training seconds of earlier attempts (resume)
        self.started = time.perf_counter()
        self.validating_since: float | None = None
        self.validation_s = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = [
                    r
                    for r in csv.DictReader(handle)
                    if int(r.get("step") or 0) <= trainer.global_step
                ]
        self.clock_offset = max((float(r.get("time_s") or 0.0) for r in self.rows), default=0.0)
        self.started, self.validation_s = time.perf_counter(), 0.0

    def training_seconds(self) -> float:
        """Seconds spent training so far, across attempts, validation excluded."""
        return self.clock_offset + time.perf_counter() - self.started - self.validation_s

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validating_since = time.perf_counter()

    def _record(self, trainer: L.Trainer, prefix: str) -> None:
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "time_s": round(self.training_seconds(), 3),
        }
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix):
                row[key] = float(value)
        self.rows.append(row)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # The methods log their losses on these steps too (care.methods.base).
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches
        if trainer.global_step % self.every == 0 or last_of_epoch:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validating_since is not None:
            self.validation_s += time.perf_counter() - self.validating_since
            self.validating_since = None
        if not trainer.sanity_checking:
            self._record(trainer, "val/")
            self.flush()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.flush()  # the rows up to a checkpoint survive a kill after it

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer = trainer.is_global_zero

    def flush(self) -> None:
        if not self.rows or not self.writer:
            return
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


@dataclass
class _Window:
    """Steps timed back to back: their count, wall time and the part spent waiting for data."""

    steps: int = 0
    elapsed: float = 0.0
    wait: float = 0.0
    last_end: float | None = None
    open: bool = False


class Throughput(Callback):
    """Images/s of the training loop as a whole, data loading included, and the share of the
    time spent waiting for the data loader.

    It reads the wall clock at each batch's start and end, without synchronising the device
    each step: over the timed window (every step after ``warmup``) the host cannot run more
    than a few steps ahead of the device, and the window's ends (and each epoch's last step)
    are synchronised, so the mean is the device's pace. The wait is the time from one step's
    end (or an epoch's start) to the next step's start, where the loop fetches the next batch
    and moves it to the device; the online kNN monitor between epochs is not counted. A run too
    short for the warm-up is timed over all its steps instead; ``step_time_over`` says which.
    """

    def __init__(self, images_per_step: int, warmup: int = 3) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self._seen = 0
        self._batch_start = 0.0
        self._timed = _Window()  # the steps after the warm-up
        self._all = _Window()  # every step, from the first one's start

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The validation before this epoch is not timed; fetching its first batch is.
        now = time.perf_counter()
        for window in (self._timed, self._all):
            window.last_end = now if window.open else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._batch_start = time.perf_counter()
        for window in (self._timed, self._all):
            if window.open and window.last_end is not None:
                window.wait += self._batch_start - window.last_end

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._seen += 1
        opens = self._seen == self.warmup  # the timed window opens once the warm-up is done
        if opens or batch_idx + 1 == trainer.num_training_batches:
            self._sync(pl_module)  # the epoch's queued device work belongs to its steps
        now = time.perf_counter()
        for window in (self._timed, self._all):
            if window.open:
                start = self._batch_start if window.last_end is None else window.last_end
                window.elapsed += now - start
                window.steps += 1
                window.last_end = now
        if not self._all.open:  # the first step counts from its own start
            self._all = _Window(1, now - self._batch_start, 0.0, now, True)
        if opens:
            self._timed = _Window(last_end=now, open=True)

    def summary(self) -> dict[str, float | int | str]:
        """``step_time_s``, ``images_per_s``, ``data_wait_share``, and the steps they cover
        (``timed_steps``, ``step_time_over``); empty before the first step."""
        window, over = self._timed, f"the steps after {self.warmup} warm-up steps"
        if window.steps == 0:
            window, over = self._all, "all steps, warm-up included (too few steps to leave it out)"
        if window.steps == 0 or window.elapsed <= 0:
            return {}
        step = window.elapsed / window.steps
        return {
            "step_time_s": step,
            "images_per_s": self.images_per_step / step,
            "data_wait_share": window.wait / window.elapsed,
            "timed_steps": window.steps,
            "step_time_over": over,
        }


class Progress(ProgressBar):
    """The pretraining's progress for a person, refreshed by the wall clock, not by steps.

    On a terminal one line is rewritten about every ``every_s`` seconds (2): the epoch, its
    steps, the loss, images/s and the ETA of the whole run (every remaining epoch and kNN check);
    the online kNN monitor's passes read ``kNN bank`` and ``kNN test``. Elsewhere (a file, a
    pipe) the same text is printed as plain lines, one every ``every_s`` seconds (30), with no
    carriage returns. Each epoch ends with a line that stays: its loss, kNN accuracy in percent
    with the bank's and test split's sizes, images/s and the run's ETA. Only rank 0 prints.
    """

    def __init__(
        self,
        images_per_step: int,
        knn: KNNMonitor | None = None,
        *,
        log_every: int = 1,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.images_per_step, self.knn = images_per_step, knn
        # the loss shown is the last logged one (every log_every steps and at epoch ends: the
        # methods log then, without a host sync on the other steps); it is labelled by its step
        self.log_every = log_every
        self._loss_at: tuple[int, int] | None = None  # (epoch, step in it) of the shown loss
        self.stream = sys.stdout if stream is None else stream
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = (2.0 if self.tty else 30.0) if every_s is None else every_s
        self.clock = clock
        self.enabled = True
        self._open = False  # a terminal line waits to be rewritten
        self._shown = -math.inf  # when the last refresh was written
        self._epoch_start = self._val_start = self._last_end = 0.0
        self._epoch_first_step = 0
        # (time, global step) at the end of the fit's and of the epoch's first step: the paces
        # count from there, without the first step's warm-up (allocations, worker start-up)
        self._fit_mark: tuple[float, int] | None = None
        self._epoch_mark: tuple[float, int] | None = None
        self._val_s = 0.0  # the kNN checks' time since the fit started
        self._val_runs = 0
        self._validated_epoch = -1

    # ------------------------------------------------------------- Lightning's interface
    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._close_line()
        print(*args, file=self.stream, **kwargs)

    # ---------------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_mark = None
        self._val_s, self._val_runs = 0.0, 0
        self.on_train_epoch_start(trainer, pl_module)  # a resumed epoch may not announce itself

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_end = self.clock()
        self._epoch_first_step = trainer.global_step
        self._epoch_mark = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = self._last_end = self.clock()
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches
        if trainer.global_step % self.log_every == 0 or last_of_epoch:  # as the methods log
            self._loss_at = (trainer.current_epoch, batch_idx + 1)
        self._fit_mark = self._fit_mark or (now, trainer.global_step)
        self._epoch_mark = self._epoch_mark or (now, trainer.global_step)
        if self.enabled and now - self._shown >= self.every_s:
            self._write(self._training_text(trainer, now), now)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            now = self.clock()
            self._write(self._epoch_text(trainer, now), now, final=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close_line()  # what explains the stop starts on a line of its own

    def end_line_now(self) -> None:
        """End an open terminal line at once, from a signal handler, so that the handler's
        message starts on a line of its own: one unbuffered write, no Python I/O (which a
        handler must not re-enter). The line was flushed when written."""
        if not self._open:
            return
        self._open = False
        try:
            os.write(self.stream.fileno(), b"\n")
        except (AttributeError, OSError, ValueError):  # no file descriptor (a test's buffer)
            self._open = True

    # ------------------------------------------------------------------ kNN monitor
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self.clock()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        now = self.clock()
        if self.enabled and now - self._shown >= self.every_s:
            part = "kNN bank" if dataloader_idx == 0 else "kNN test"
            batches = trainer.num_val_batches
            total = batches[dataloader_idx] if isinstance(batches, list) else batches
            text = f"{self._epoch_label(trainer)} {part} {batch_idx + 1}/{total}"
            self._write(text, now)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_s += self.clock() - self._val_start
        self._val_runs += 1
        self._validated_epoch = trainer.current_epoch

    # ------------------------------------------------------------------------ text
    @staticmethod
    def _epoch_label(trainer: L.Trainer) -> str:
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def _images_per_s(self, trainer: L.Trainer, *, whole: bool = False) -> float | None:
        """The epoch's pace after its first step; ``whole``: with it, if it is the only one."""
        if self._epoch_mark is None:
            return None
        start, first = self._epoch_mark
        steps, seconds = trainer.global_step - first, self._last_end - start
        if (steps <= 0 or seconds <= 0) and whole:
            steps = trainer.global_step - self._epoch_first_step
            seconds = self._last_end - self._epoch_start
        return steps * self.images_per_step / seconds if steps > 0 and seconds > 0 else None

    def eta_s(self, trainer: L.Trainer, now: float) -> float | None:
        """Seconds left in the whole run: its remaining steps at this fit's pace (after its
        first step), and its remaining kNN checks at the pace of those done."""
        if self._fit_mark is None:
            return None
        start, first = self._fit_mark
        done = trainer.global_step - first
        if done <= 0:
            return None
        per_step = max(0.0, now - start - self._val_s) / done
        total = (trainer.max_epochs or 0) * trainer.num_training_batches
        eta = max(0, total - trainer.global_step) * per_step
        if self._val_runs:
            every = max(1, trainer.check_val_every_n_epoch or 1)
            epochs = range(trainer.current_epoch, trainer.max_epochs or 0)
            left = [e for e in epochs if (e + 1) % every == 0 and e != self._validated_epoch]
            eta += len(left) * self._val_s / self._val_runs
        return eta

    def _loss_label(self, trainer: L.Trainer, step: int) -> str:
        """Where the shown loss comes from when it is not the ``step`` shown: `` (step 20)`` of
        this epoch, or `` (epoch 1 step 39)`` of an earlier one."""
        if self._loss_at is None or self._loss_at == (trainer.current_epoch, step):
            return ""
        epoch, at = self._loss_at
        if epoch == trainer.current_epoch:
            return f" (step {at})"
        return f" (epoch {epoch + 1} step {at})"

    def _metrics(
        self, trainer: L.Trainer, *, whole: bool = False, step: int | None = None
    ) -> list[str]:
        """Loss (labelled by its step when it is not that of ``step``) and images/s."""
        parts = []
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            label = "" if step is None else self._loss_label(trainer, step)
            parts.append(f"loss {float(loss):.4f}{label}")
        rate = self._images_per_s(trainer, whole=whole)
        if rate is not None:
            parts.append(f"{rate:,.0f} img/s")
        return parts

    def _training_text(self, trainer: L.Trainer, now: float) -> str:
        per_epoch = trainer.num_training_batches
        step = int(trainer.global_step - trainer.current_epoch * per_epoch)
        parts = self._metrics(trainer, step=step)
        eta = self.eta_s(trainer, now)
        if eta is not None:
            parts.append(f"ETA {clock_text(eta)} (whole run)")
        if self.tty:
            filled = round(20 * step / max(1, per_epoch))
            bar = "█" * filled + "░" * (20 - filled)
            return f"{self._epoch_label(trainer)} {bar} {step}/{per_epoch}  " + "  ".join(parts)
        percent = 100 * step / max(1, per_epoch)
        text = f"{self._epoch_label(trainer)} step {step}/{per_epoch} ({percent:.0f}%)"
        return f"{text}: {', '.join(parts)}" if parts else text

    def _epoch_text(self, trainer: L.Trainer, now: float) -> str:
        parts = self._metrics(trainer, whole=True)
        knn = trainer.callback_metrics.get("val/knn_acc")
        if knn is not None and self._validated_epoch == trainer.current_epoch:
            sizes = ""
            if self.knn is not None and self.knn.bank_size is not None:
                sizes = f" (bank {self.knn.bank_size:,}, test {self.knn.test_size:,} images)"
            parts.append(f"kNN {float(knn):.2f}%{sizes}")
        eta = self.eta_s(trainer, now)
        if eta is not None and trainer.current_epoch + 1 < (trainer.max_epochs or 0):
            parts.append(f"ETA {clock_text(eta)} (whole run)")
        took = clock_text(now - self._epoch_start)
        return f"{self._epoch_label(trainer)} done in {took}: " + ", ".join(parts)

    # ----------------------------------------------------------------------- output
    def _write(self, text: str, now: float, *, final: bool = False) -> None:
        if self.tty:  # a line rewritten in place must not wrap; a final one stays whole
            width = max(20, shutil.get_terminal_size().columns - 1)
            shown = text if final else text[:width]
            self.stream.write("\r" + shown + "\x1b[K" + ("\n" if final else ""))
            self._open = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = now

    def _close_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
