"""Assemble a Lightning Trainer from the config and run a pretraining into a run directory."""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Sampler

from care.config import Config
from care.data import LabeledImages, load_dataset
from care.errors import CareError
from care.evaluate.knn import weighted_knn_accuracy
from care.methods import ContrastiveMethod, DataInfo, build_method
from care.runs import (
    RunDir,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    safe_torch_load,
    save_weights,
)

NATIVE_SIZE = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96}


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), and shards by rank.

    Lightning calls :meth:`set_epoch` each epoch, so a resumed run sees the same order as an
    uninterrupted one. Every rank gets ``len // world_size`` indices (the tail is dropped).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)[: len(self) * self.world_size]
        return iter(order[self.rank :: self.world_size].tolist())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically, and read back with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        loaded = safe_torch_load(path, map_location="cpu")
        if not isinstance(loaded, dict):
            raise CareError(f"checkpoint {path} does not hold a training state")
        return loaded


class KNNMonitor(Callback):
    """Online weighted-kNN accuracy of backbone features, once per validation epoch.

    Validation loader 0 is the labelled bank (training images), loader 1 the test split.
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

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.outputs[0] or not self.outputs[1]:
            return
        bank, test = (
            {k: torch.cat([o[k] for o in self.outputs[i]]) for k in ("features", "labels")}
            for i in (0, 1)
        )
        accuracy = weighted_knn_accuracy(
            bank["features"],
            bank["labels"],
            test["features"],
            test["labels"],
            self.num_classes,
            self.k,
            self.temperature,
        )
        # Every rank sees the whole validation set, so the value is the same on all of them.
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
    """Wall time of each training step (forward, backward, optimiser), after a short warm-up."""

    def __init__(self, images_per_step: int, warmup: int = 3) -> None:
        self.images_per_step, self.warmup = images_per_step, warmup
        self.times: list[float] = []
        self._start = 0.0
        self._seen = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._sync(pl_module)
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(time.perf_counter() - self._start)

    def summary(self) -> dict[str, float]:
        if not self.times:
            return {}
        step = sorted(self.times)[len(self.times) // 2]
        return {"step_time_s": step, "images_per_s": self.images_per_step / step}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); without, oneDNN emulates it."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def data_info(cfg: Config, dataset: LabeledImages) -> DataInfo:
    """Channels, output size and normalisation of a dataset under this config."""
    stored = dataset.image_shape[-1]
    size = cfg.image_size or NATIVE_SIZE.get(cfg.dataset, 224)
    crop = min(1.0, size / stored) if cfg.dataset == "imagefolder" else 1.0
    return DataInfo(
        channels=dataset.channels,
        image_size=size,
        mean=tuple(dataset.mean),
        std=tuple(dataset.std),
        num_classes=dataset.num_classes,
        eval_crop_fraction=crop,
    )


def load_split(cfg: Config, split: str) -> LabeledImages:
    return load_dataset(
        cfg.dataset, cfg.data_root, split, load_size=cfg.load_size, class_list=cfg.class_list
    )


def _loader(
    dataset: LabeledImages, cfg: Config, sampler: Sampler[int] | None, drop_last: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def prepare_run(cfg: Config) -> tuple[RunDir, Path | None]:
    """Check the run directory against ``resume``; return it and the checkpoint to resume from."""
    run = RunDir(cfg.out)
    if run.last_checkpoint.is_file():
        if not cfg.resume:
            raise CareError(
                f"{run.root} already holds a run: pass resume=true to continue it, or choose "
                "another out=DIR"
            )
        saved = run.read_config().to_dict()
        current = cfg.to_dict()
        changed = [k for k in saved if k not in ("resume", "epochs") and saved[k] != current[k]]
        if changed:
            raise CareError(
                f"resume=true with a different '{changed[0]}' than the run in {run.root} "
                f"({saved[changed[0]]!r}): keep the run's settings or choose another out=DIR"
            )
        return run, run.last_checkpoint
    return run, None


def pretrain(cfg: Config) -> RunDir:
    """Pretrain ``cfg.method`` and write the run directory ``cfg.out``."""
    run, resume_from = prepare_run(cfg)
    pretrain_set = load_split(cfg, "pretrain")
    if cfg.train_samples is not None:
        pretrain_set = pretrain_set.subset(cfg.train_samples)
    world = cfg.devices * cfg.num_nodes
    if len(pretrain_set) < cfg.batch_size * world:
        raise CareError(
            f"{len(pretrain_set)} training images are fewer than one global batch "
            f"(batch_size={cfg.batch_size} × {world} devices): lower batch_size or raise "
            "train_samples"
        )
    if cfg.sync_batchnorm and not torch.cuda.is_available():
        raise CareError(
            "sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel): "
            "set sync_batchnorm=false"
        )
    info = data_info(cfg, pretrain_set)
    val_loaders: list[DataLoader] = []
    if cfg.knn_every > 0:
        bank = load_split(cfg, "train")
        if cfg.knn_bank_samples is not None and cfg.knn_bank_samples < len(bank):
            bank = bank.subset(cfg.knn_bank_samples)
        val_loaders = [
            _loader(bank, cfg, None, False),
            _loader(load_split(cfg, "test"), cfg, None, False),
        ]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method: ContrastiveMethod = build_method(cfg, info)
    throughput = Throughput(cfg.batch_size * world)
    callbacks: list[Callback] = [
        # No monitor + save_top_k=1: keep only the latest epoch, always under the name last.ckpt.
        ModelCheckpoint(
            dirpath=run.checkpoints,
            filename="last",
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        ),
        MetricsCSV(run.metrics, cfg.log_every),
        throughput,
        TQDMProgressBar(refresh_rate=max(1, cfg.log_every // 2)),
    ]
    if val_loaders:
        callbacks += [
            KNNMonitor(info.num_classes, cfg.knn_k, cfg.knn_temperature),
            ModelCheckpoint(
                dirpath=run.checkpoints,
                filename="best",
                monitor="val/knn_acc",
                mode="max",
                save_top_k=1,
                enable_version_counter=False,
            ),
        ]
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        sync_batchnorm=cfg.sync_batchnorm,
        precision=cfg.precision,  # type: ignore[arg-type]
        logger=TensorBoardLogger(str(run.root), name="tensorboard", version=""),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        check_val_every_n_epoch=max(1, cfg.knn_every),
        limit_val_batches=1.0 if val_loaders else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every,
        enable_model_summary=False,
        default_root_dir=str(run.root),
    )
    emulated_bf16 = trainer.strategy.root_device.type == "cpu" and not cpu_has_native_bf16()
    if trainer.is_global_zero and cfg.precision == "bf16-mixed" and emulated_bf16:
        print(
            "warning: precision=bf16-mixed on a CPU without avx512_bf16 or AMX is emulated and"
            " many times slower than fp32; use precision=32 on this machine",
            file=sys.stderr,
        )
    if trainer.is_global_zero:  # rank 0 alone writes; Lightning saves checkpoints on rank 0 only
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
    sampler = EpochSampler(len(pretrain_set), cfg.seed, trainer.global_rank, trainer.world_size)
    train_loader = _loader(pretrain_set, cfg, sampler, drop_last=True)
    started = time.perf_counter()
    trainer.fit(
        method,
        train_loader,
        val_loaders or None,
        ckpt_path=str(resume_from) if resume_from else None,
    )
    if trainer.global_rank == 0:
        save_weights(method.backbone, run.backbone)
        save_weights(method.head, run.head)
        knn = trainer.callback_metrics.get("val/knn_acc")
        atomic_write_json(
            run.summary,
            {
                "method": cfg.method,
                "views": cfg.views if cfg.grouped else None,
                "dataset": cfg.dataset,
                "train_images": len(pretrain_set),
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "devices": cfg.devices,
                "num_nodes": cfg.num_nodes,
                "world_size": trainer.world_size,
                "batch_size_per_device": cfg.batch_size,
                "global_batch": cfg.batch_size * trainer.world_size,
                "precision": cfg.precision,
                "final_knn_acc": None if knn is None else float(knn),
                "wall_time_s": time.perf_counter() - started,
                **throughput.summary(),
            },
        )
    return run
