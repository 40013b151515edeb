"""The Lightning callbacks of a pretraining: the online kNN monitor, metrics.csv, step time."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from care.data import unshard
from care.metrics import weighted_knn_accuracy
from care.runs import atomic_write_text


class KNNMonitor(Callback):
    """Online weighted-kNN accuracy of backbone features, once per validation epoch.

    Validation loader 0 is the labelled bank (training images), loader 1 the test split. On
    several processes each rank embeds its
    :class:`care.data.ShardSampler` shard of both; the shards are all-gathered and put back in
    dataset order, so every rank computes the single-process accuracy.
    """

    def __init__(self, num_classes: int, k: int, temperature: float) -> None:
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.outputs: dict[int, list[dict[str, torch.Tensor]]] = {0: [], 1: []}

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
        # Every rank computed it from all the features, so the value is the same on all of them.
        pl_module.log("val/knn_acc", accuracy, prog_bar=True, sync_dist=True)
        self.outputs = {0: [], 1: []}


class MetricsCSV(Callback):
    """``metrics.csv``: one row per logged step and per validation, rewritten atomically.

    On resume, rows past the restored step (from the killed attempt) are dropped.
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.rows: list[dict[str, Any]] = []
        self.writer = True  # rank 0 alone writes (set at fit start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = [
                    r
                    for r in csv.DictReader(handle)
                    if int(r.get("step") or 0) <= trainer.global_step
                ]

    def _record(self, trainer: L.Trainer, prefix: str) -> None:
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix):
                row[key] = float(value)
        self.rows.append(row)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val/")
            self.flush()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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


class Throughput(Callback):
    """Images/s of the training loop as a whole, data loading included, and the share of the
    time spent waiting for the data loader.

    It reads the wall clock at each batch's start and end, without synchronising the device
    each step: over the timed window (every step after ``warmup``) the host cannot run more
    than a few steps ahead of the device, and the window's ends (and each epoch's last step)
    are synchronised, so the mean is the device's pace. The wait is the time from one step's
    end (or an epoch's start) to the next step's start, where the loop fetches the next batch
    and moves it to the device; the online kNN monitor between epochs is not counted.
    """

    def __init__(self, images_per_step: int, warmup: int = 3) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self._seen = 0
        self._batch_start = 0.0
        self._window_start: float | None = None
        self._last_end: float | None = None
        self._steps = 0
        self._wait = 0.0
        self._elapsed = 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The validation before this epoch is not timed; fetching its first batch is.
        self._last_end = None if self._window_start is None else time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._batch_start = time.perf_counter()
        if self._window_start is not None and self._last_end is not None:
            self._wait += self._batch_start - self._last_end

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._seen += 1
        if self._seen == self.warmup:  # the window opens once the warm-up steps are done
            self._sync(pl_module)
            self._window_start = self._last_end = time.perf_counter()
            return
        if self._window_start is None:
            return
        if batch_idx + 1 == trainer.num_training_batches:
            self._sync(pl_module)  # the epoch's queued device work belongs to its steps
        now = time.perf_counter()
        self._elapsed += now - (self._batch_start if self._last_end is None else self._last_end)
        self._steps += 1
        self._last_end = now

    def summary(self) -> dict[str, float]:
        if self._steps == 0 or self._elapsed <= 0:
            return {}
        step = self._elapsed / self._steps
        return {
            "step_time_s": step,
            "images_per_s": self.images_per_step / step,
            "data_wait_share": self._wait / self._elapsed,
        }
