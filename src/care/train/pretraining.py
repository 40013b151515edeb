"""Assemble a Lightning Trainer from the config and run a pretraining into a run directory."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from torch.utils.data import DataLoader

from care.config import Config, training_differences, with_overrides
from care.data import (
    EpochSampler,
    LabeledImages,
    ResumableLoader,
    data_info,
    folder_image_sizes,
    load_split,
    make_loader,
)
from care.data.registry import get_spec
from care.distributed import is_global_zero
from care.errors import CareError
from care.hardware import configure_backends, cpu_has_native_bf16, resolve
from care.methods import build_method, method_class, views_label
from care.progress import progress_interval
from care.runs import (
    AtomicCheckpointIO,
    RunDir,
    atomic_write_files,
    atomic_write_json,
    open_run,
    rank_zero_lock,
    weights_bytes,
)
from care.train.callbacks import KNNMonitor, MetricsCSV, Progress, Throughput
from care.train.checkpoints import LastCheckpoint, LoaderPosition, SameCheckpointOnEveryRank
from care.train.loggers import build_loggers, finish_loggers
from care.train.memory import check_step_fits


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
        cfg, sizes = with_image_sizes(cfg)
        finished = finished_run(cfg)
        if finished is not None:  # resume=true on a finished run: nothing to train or write
            return finished
        if sizes and is_global_zero():
            print(sizes, flush=True)
        return train_into_run(cfg)


class FinishedRun(RunDir):
    """A run that had trained all its ``epochs`` when :func:`pretrain` was asked to resume it:
    nothing was trained and no file of it changed."""


def finished_run(cfg: Config) -> FinishedRun | None:
    """The run in ``cfg.out`` if ``resume=true`` asks to continue a run that already finished
    ``cfg.epochs`` epochs with ``cfg``'s settings (its summary, weights and checkpoint exist);
    None otherwise (a new run, an unfinished one, one extended to more epochs, or other
    settings, which :func:`care.runs.open_run` refuses)."""
    run = RunDir(cfg.out)
    if not cfg.resume:
        return None
    needed = (run.summary, run.backbone, run.head, run.last_checkpoint, run.config)
    if not all(path.is_file() for path in needed):
        return None
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("epochs") != cfg.epochs:
        return None
    if training_differences(run.read_config(), cfg):
        return None
    return FinishedRun(run.root)


def with_image_sizes(cfg: Config) -> tuple[Config, str]:
    """``cfg`` with image-folder sizes filled in where unset, and the line that says so ("" when
    nothing was chosen): a run being resumed keeps the sizes it was trained at (its
    config.yaml; None there means the defaults of care before sizes were derived); a new run
    takes them from its images (:func:`care.data.folder_image_sizes`)."""
    if cfg.image_size is not None and cfg.load_size is not None:
        return cfg, ""
    if get_spec(cfg.dataset).image_size is not None:  # a dataset of one stored size
        return cfg, ""
    run = RunDir(cfg.out)
    if run.last_checkpoint.is_file() and run.config.is_file():
        saved = run.read_config()
        image_size = cfg.image_size if cfg.image_size is not None else saved.image_size
        load_size = cfg.load_size if cfg.load_size is not None else saved.load_size
        return with_overrides(cfg, {"image_size": image_size, "load_size": load_size}), ""
    sizes = folder_image_sizes(cfg)
    chosen = with_overrides(cfg, {"image_size": sizes.image_size, "load_size": sizes.load_size})
    return chosen, sizes.describe()


def train_into_run(cfg: Config) -> RunDir:
    """:func:`pretrain` of a resolved ``cfg`` whose ``out`` this process holds the lock of."""
    run, resume_from = open_run(cfg)
    images = pretraining_images(cfg)
    info = data_info(cfg, images)
    # a step that cannot fit is refused now, not killed by the kernel (or CUDA) later
    check_step_fits(cfg, info, images.image_shape[-1])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method = build_method(cfg, info)
    images_per_step = cfg.batch_size * cfg.devices * cfg.num_nodes
    throughput = Throughput(images_per_step)
    knn = knn_callbacks(cfg, run, info.num_classes) if knn_monitored(cfg) else []
    knn_monitor = next((c for c in knn if isinstance(c, KNNMonitor)), None)
    # refreshed by the clock, not on logging steps: it shows the last logged loss, and its step
    progress = Progress(
        images_per_step, knn_monitor, log_every=cfg.log_every, every_s=progress_interval()
    )
    callbacks: list[Callback] = [
        SameCheckpointOnEveryRank(resume_from, run.root),
        LastCheckpoint(run.last_checkpoint, cfg.checkpoint_every_steps, progress.end_line_now),
        position := LoaderPosition(),
        MetricsCSV(run.metrics, cfg.log_every),
        throughput,
        progress,
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
        atomic_write_files(  # one result: backbone and head are replaced together
            {
                run.backbone: weights_bytes(
                    method.encoder.backbone, run.weights_metadata(cfg, info, images, "backbone")
                ),
                run.head: weights_bytes(
                    method.encoder.head, run.weights_metadata(cfg, info, images, "projection")
                ),
            }
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
    run's checkpoint and requeues (:mod:`care.train.signals`). A run that torchrun started takes
    its ranks from torchrun even inside a SLURM job, as Lightning's own order has it: the SLURM
    environment is named only where torchrun's is absent (:func:`cluster_plugins`).
    """
    plugins: list[Any] = [AtomicCheckpointIO(), *cluster_plugins()]
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


def cluster_plugins() -> list[Any]:
    """The cluster environment to hand Lightning: SLURM's, with Lightning's requeue off (care
    requeues itself after its checkpoint), when the processes were started by ``srun``; none
    when torchrun started them (inside a SLURM allocation too), so that Lightning reads the
    ranks from torchrun's variables, which come first in its own order."""
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def warn_if_bf16_is_emulated(cfg: Config, trainer: L.Trainer) -> None:
    """One line on stderr when bf16-mixed runs on a CPU that emulates bf16."""
    emulated = trainer.strategy.root_device.type == "cpu" and not cpu_has_native_bf16()
    if cfg.precision == "bf16-mixed" and emulated:
        print(
            "warning: precision=bf16-mixed on a CPU without avx512_bf16 or AMX is emulated and"
            " many times slower than fp32; use precision=32 on this machine",
            file=sys.stderr,
        )
