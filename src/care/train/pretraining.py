"""Assemble a Lightning Trainer from the config and run a pretraining into a run directory."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader

from care.config import Config
from care.data import (
    EpochSampler,
    LabeledImages,
    ResumableLoader,
    data_info,
    load_split,
    make_loader,
)
from care.errors import CareError
from care.hardware import configure_backends, cpu_has_native_bf16, resolve
from care.methods import build_method, method_class, views_label
from care.runs import (
    AtomicCheckpointIO,
    RunDir,
    atomic_write_json,
    open_run,
    rank_zero_lock,
    save_weights,
)
from care.train.callbacks import KNNMonitor, MetricsCSV, Progress, Throughput
from care.train.checkpoints import LastCheckpoint, LoaderPosition, SameCheckpointOnEveryRank
from care.train.loggers import build_loggers, finish_loggers


def pretrain(cfg: Config) -> RunDir:
    """Pretrain ``cfg.method`` and write the run directory ``cfg.out``.

    ``precision=auto`` and ``memory_format=auto`` are resolved for the accelerator first
    (:func:`care.hardware.resolve`); the run directory keeps the resolved values.
    """
    method_class(cfg)  # a config the method cannot train fails before anything is read
    cfg = resolve(cfg)
    configure_backends(cfg)
    if cfg.sync_batchnorm and not torch.cuda.is_available():
        raise CareError(
            "sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel): "
            "set sync_batchnorm=false"
        )
    with rank_zero_lock(cfg.out, "care pretrain"):  # one run per directory
        return train_into_run(cfg)


def train_into_run(cfg: Config) -> RunDir:
    """:func:`pretrain` of a resolved ``cfg`` whose ``out`` this process holds the lock of."""
    run, resume_from = open_run(cfg)
    images = pretraining_images(cfg)
    info = data_info(cfg, images)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method = build_method(cfg, info)
    images_per_step = cfg.batch_size * cfg.devices * cfg.num_nodes
    throughput = Throughput(images_per_step)
    knn = knn_callbacks(cfg, run, info.num_classes) if knn_monitored(cfg) else []
    knn_monitor = next((c for c in knn if isinstance(c, KNNMonitor)), None)
    callbacks: list[Callback] = [
        SameCheckpointOnEveryRank(resume_from, run.root),
        LastCheckpoint(run.last_checkpoint, cfg.checkpoint_every_steps),
        position := LoaderPosition(),
        MetricsCSV(run.metrics, cfg.log_every),
        throughput,
        # refreshed by the clock, not on logging steps: it shows the last logged loss
        Progress(images_per_step, knn_monitor, every_s=progress_interval()),
        *knn,
    ]
    trainer = build_trainer(cfg, run, callbacks)
    monitor = knn_monitor_loaders(cfg, trainer.global_rank, trainer.world_size)
    if trainer.is_global_zero:  # rank 0 alone writes; Lightning saves checkpoints on rank 0 only
        warn_if_bf16_is_emulated(cfg, trainer)
        run.root.mkdir(parents=True, exist_ok=True)
        cfg = run.with_data_root(cfg)  # config.yaml names the folder the data was read from
        run.write_config(cfg)
    sampler = EpochSampler(len(images), cfg.seed, trainer.global_rank, trainer.world_size)
    loader = make_loader(images, cfg, sampler)
    assert isinstance(loader, ResumableLoader)
    position.loader = loader  # the rank's loader needs the trainer first
    started = time.perf_counter()
    trainer.fit(
        method,
        loader,
        monitor or None,
        ckpt_path=str(resume_from) if resume_from else None,
    )
    finish_loggers(trainer.loggers)
    if trainer.global_rank == 0:
        save_weights(
            method.encoder.backbone,
            run.backbone,
            run.weights_metadata(cfg, info, images, "backbone"),
        )
        save_weights(
            method.encoder.head, run.head, run.weights_metadata(cfg, info, images, "projection")
        )
        run.write_encoder_export()  # encoder.pt2: the backbone for PyTorch without care
        knn_acc = trainer.callback_metrics.get("val/knn_acc")
        atomic_write_json(
            run.summary,
            {
                "method": cfg.method,
                "views": views_label(cfg),
                "dataset": cfg.dataset,
                "train_images": len(images),
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "devices": cfg.devices,
                "num_nodes": cfg.num_nodes,
                "world_size": trainer.world_size,
                "batch_size_per_device": cfg.batch_size,
                "global_batch": cfg.batch_size * trainer.world_size,
                "precision": cfg.precision,
                "memory_format": cfg.memory_format,
                # the online monitor's last check, in %, over a bank of knn_bank_size images
                "final_knn_acc_percent": None if knn_acc is None else float(knn_acc),
                "knn_bank_size": None if knn_monitor is None else knn_monitor.bank_size,
                "knn_test_size": None if knn_monitor is None else knn_monitor.test_size,
                "wall_time_s": time.perf_counter() - started,
                **throughput.summary(),
            },
        )
    return run


def progress_interval() -> float | None:
    """Seconds between progress refreshes from ``CARE_PROGRESS_S`` (0: every step), or None
    for :class:`Progress`'s own (2 s on a terminal, 30 s in a file or a pipe)."""
    value = os.environ.get("CARE_PROGRESS_S", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CareError(
            f"CARE_PROGRESS_S={value!r} is not a number of seconds: give e.g. 2 (0: every step) "
            "or unset it"
        )
    return seconds


def pretraining_images(cfg: Config) -> LabeledImages:
    """The pretraining split (its first ``train_samples``), checked against the global batch."""
    images = load_split(cfg, "pretrain")
    if cfg.train_samples is not None:
        images = images.subset(cfg.train_samples)
    world = cfg.devices * cfg.num_nodes
    if len(images) < cfg.batch_size * world:
        raise CareError(
            f"{len(images)} training images are fewer than one global batch "
            f"(batch_size={cfg.batch_size} × {world} devices): lower batch_size or raise "
            "train_samples"
        )
    return images


def knn_monitor_loaders(cfg: Config, rank: int = 0, world_size: int = 1) -> list[DataLoader]:
    """The online kNN monitor's bank (the first ``knn_bank_samples`` training images) and test
    split, this rank's shard of each, or none when the monitor is off."""
    if not knn_monitored(cfg):
        return []
    bank = load_split(cfg, "train")
    if cfg.knn_bank_samples is not None and cfg.knn_bank_samples < len(bank):
        bank = bank.subset(cfg.knn_bank_samples)
    test = load_split(cfg, "test")
    return [make_loader(split, cfg, rank=rank, world_size=world_size) for split in (bank, test)]


def knn_monitored(cfg: Config) -> bool:
    """Whether the online kNN monitor runs: every ``knn_every`` epochs or ``knn_every_steps``."""
    return cfg.knn_every > 0 or cfg.knn_every_steps > 0


def knn_schedule(cfg: Config) -> dict[str, Any]:
    """The Trainer's validation settings: none without the monitor; every ``knn_every_steps``
    training steps counted across epochs when that is set (the accuracy-against-time curve), else
    every ``knn_every`` epochs."""
    monitored = knn_monitored(cfg)
    schedule: dict[str, Any] = {
        "limit_val_batches": 1.0 if monitored else 0,
        "enable_checkpointing": monitored,  # best.ckpt; LastCheckpoint writes last.ckpt
    }
    if cfg.knn_every_steps > 0:
        return schedule | {
            "val_check_interval": cfg.knn_every_steps,
            "check_val_every_n_epoch": None,
        }
    return schedule | {"check_val_every_n_epoch": max(1, cfg.knn_every)}


def knn_callbacks(cfg: Config, run: RunDir, num_classes: int) -> list[Callback]:
    """The online kNN monitor and best.ckpt, the checkpoint with the best kNN accuracy."""
    return [
        KNNMonitor(num_classes, cfg.knn_k, cfg.knn_temperature),
        ModelCheckpoint(
            dirpath=run.checkpoints,
            filename="best",
            monitor="val/knn_acc",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
    ]


def build_trainer(cfg: Config, run: RunDir, callbacks: list[Callback]) -> L.Trainer:
    """The Lightning Trainer of ``cfg``: devices, precision, logs and checkpoints in ``run``.

    Under SLURM, Lightning's own requeue on SIGUSR1 is off: :class:`LastCheckpoint` writes the
    run's checkpoint and requeues (:mod:`care.train.signals`).
    """
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        sync_batchnorm=cfg.sync_batchnorm,
        precision=cfg.precision,  # type: ignore[arg-type]
        logger=build_loggers(cfg, run) or False,
        callbacks=callbacks,
        plugins=plugins,
        use_distributed_sampler=False,
        **knn_schedule(cfg),
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every,
        enable_model_summary=False,
        default_root_dir=str(run.root),
    )


def warn_if_bf16_is_emulated(cfg: Config, trainer: L.Trainer) -> None:
    """One line on stderr when bf16-mixed runs on a CPU that emulates bf16."""
    emulated = trainer.strategy.root_device.type == "cpu" and not cpu_has_native_bf16()
    if cfg.precision == "bf16-mixed" and emulated:
        print(
            "warning: precision=bf16-mixed on a CPU without avx512_bf16 or AMX is emulated and"
            " many times slower than fp32; use precision=32 on this machine",
            file=sys.stderr,
        )
