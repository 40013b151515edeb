"""`care probe RUN_DIR`: frozen-backbone linear probe (3 seeds) and weighted kNN → probe.json.

Protocol (paper, Appendix G): a linear classifier on frozen backbone features. The optimiser is
``probe_optimizer``: ``adam`` (the CIFAR/STL10 protocol, lr 1e-3, weight decay 1e-6) or ``sgd``
(momentum 0.9, no Nesterov; the ImageNet100 protocol, lr 30 dropped 10x at epochs 30, 40 and 50).
``probe_milestones`` lists the epochs (counted from 0, as in the MoCo code) from which the lr is
multiplied by 0.1 once more; empty means a constant lr. Features are extracted once from
un-augmented images and standardised with the training set's mean and std (an affine map, so the
probe stays linear); the reported accuracy is the test accuracy after the last epoch, with no
model selection on test.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from care.config import EVALUATION_KEYS, Config, with_overrides
from care.data import data_info, load_split, resolve_data_root
from care.errors import CareError
from care.evaluate.features import extract_features
from care.hardware import (
    evaluation_device,
    evaluation_precision,
    requested_precision,
    resolve_memory_format,
    torch_memory_format,
)
from care.methods import views_label
from care.metrics import weighted_knn_accuracy
from care.progress import CommandProgress
from care.runs import RunDir, atomic_write_json, load_trained_encoder

PROBE_OPTIMIZERS = ("adam", "sgd")
"""The linear probe's optimisers (``probe_optimizer``)."""
PROBE_MOMENTUM = 0.9
"""Momentum of the SGD probe (MoCo's ``main_lincls.py``); Nesterov is off."""


@dataclass(frozen=True)
class LinearProbeResult:
    """Test accuracy (%) of the linear probe over its seeds, and the settings that produced it."""

    mean: float
    std: float
    per_seed: list[float]
    epochs: int
    lr: float
    weight_decay: float
    optimizer: str = "adam"
    milestones: tuple[int, ...] = ()
    momentum: float | None = None  # SGD only
    batch_size: int = 256


def probe_lr_at(epoch: int, lr: float, milestones: Sequence[int]) -> float:
    """The probe's lr during ``epoch`` (0-based): ``lr`` times 0.1 per milestone <= ``epoch``."""
    return lr * 0.1 ** sum(1 for m in milestones if epoch >= m)


def train_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    batch_size: int = 256,
    seed: int = 0,
    optimizer: str = "adam",
    milestones: Sequence[int] = (),
) -> float:
    """Test accuracy (in [0, 1]) of a linear classifier trained on fixed features.

    ``optimizer`` is ``adam`` or ``sgd`` (momentum 0.9); the lr of epoch ``e`` is
    :func:`probe_lr_at` ``(e, lr, milestones)``.
    """
    (accuracy,) = train_linear_probes(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        seeds=(seed,),
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        optimizer=optimizer,
        milestones=milestones,
    )
    return accuracy


def train_linear_probes(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    seeds: Sequence[int],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    batch_size: int = 256,
    optimizer: str = "adam",
    milestones: Sequence[int] = (),
    on_epoch: Callable[[], None] | None = None,
) -> list[float]:
    """:func:`train_linear_probe` for each of ``seeds``, trained side by side.

    Seed ``s`` gets its own initial classifier (``nn.Linear`` after ``torch.manual_seed(s)``)
    and its own order of the training samples; the classifiers are stacked into one ``(K, d, C)``
    weight and each step is one batched matmul over the seeds. Adam and SGD act elementwise and
    the loss is the sum of the seeds' mean losses, so every seed trains exactly as it would
    alone, in a third of the Python steps for three seeds. ``on_epoch`` is called after each epoch.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    orders, weights, biases = [], [], []
    for seed in seeds:
        orders.append(torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        layer = nn.Linear(train_x.shape[1], num_classes, dtype=train_x.dtype)
        weights.append(layer.weight.detach().T)
        biases.append(layer.bias.detach()[None])
    weight = nn.Parameter(torch.stack(weights))  # (K, d, C)
    bias = nn.Parameter(torch.stack(biases))  # (K, 1, C)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(
            [weight, bias],
            lr=lr,
            momentum=PROBE_MOMENTUM,
            nesterov=False,
            weight_decay=weight_decay,
        )
    else:
        raise CareError(
            f"bad value for 'probe_optimizer': {optimizer!r}; choose one of {list(PROBE_OPTIMIZERS)}"
        )
    labels = train_y.long()
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = probe_lr_at(epoch, lr, milestones)
        order = torch.stack([torch.randperm(train_x.shape[0], generator=g) for g in orders])
        for start in range(0, order.shape[1], batch_size):
            idx = order[:, start : start + batch_size]  # (K, B): each seed's own batch
            logits = torch.baddbmm(bias, train_x[idx], weight)  # (K, B, C)
            loss = (
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels[idx].flatten(), reduction="sum"
                )
                / idx.shape[1]
            )  # the sum over seeds of each seed's mean loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch()
    with torch.no_grad():
        predicted = torch.baddbmm(bias, test_x.expand(len(seeds), -1, -1), weight).argmax(2)
    return (predicted == test_y.long()).double().mean(1).tolist()


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    cfg: Config,
    label: str = "linear probe",
) -> LinearProbeResult:
    """The probe over ``cfg.probe_seeds`` seeds: mean ± std of test accuracy (in %), with its
    progress in epochs (a live line on a terminal, a line every 30 s in a file or a pipe)."""
    description = f"{label} ({cfg.probe_seeds} seeds)"
    with CommandProgress(description, cfg.probe_epochs, unit="epochs") as progress:

        def epoch_done() -> None:
            progress.advance(1, f"epoch {int(progress.done) + 1}/{cfg.probe_epochs} done")

        accuracies = [
            100.0 * accuracy
            for accuracy in train_linear_probes(
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes,
                seeds=range(cfg.probe_seeds),
                epochs=cfg.probe_epochs,
                lr=cfg.probe_lr,
                weight_decay=cfg.probe_weight_decay,
                batch_size=cfg.probe_batch_size,
                optimizer=cfg.probe_optimizer,
                milestones=cfg.probe_milestones,
                on_epoch=epoch_done,
            )
        ]
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return LinearProbeResult(
        statistics.fmean(accuracies),
        std,
        accuracies,
        cfg.probe_epochs,
        cfg.probe_lr,
        cfg.probe_weight_decay,
        optimizer=cfg.probe_optimizer,
        milestones=tuple(cfg.probe_milestones),
        momentum=PROBE_MOMENTUM if cfg.probe_optimizer == "sgd" else None,
        batch_size=cfg.probe_batch_size,
    )


#: Evaluation settings that do not change a probe's result (where and how fast it runs).
UNRESULTING_KEYS = ("num_workers", "accelerator")


def probe_file_name(
    saved: Config, cfg: Config, precision: str | None = None, default_precision: str | None = None
) -> str:
    """``probe.json`` for the run's own probe settings, else a name that lists the settings that
    differ (``probe-epochs=1-seeds=1.json``), so that a quick re-probe never overwrites the real
    one. ``data_root`` counts when it names another folder; the feature ``precision`` when it
    differs from the one this machine would choose."""
    changes: list[str] = []
    for key in EVALUATION_KEYS:
        if key in UNRESULTING_KEYS:
            continue
        old, new = getattr(saved, key), getattr(cfg, key)
        if key == "data_root":
            old_root = resolve_data_root(saved.dataset, old).absolute()
            new_root = resolve_data_root(cfg.dataset, new).absolute()
            if old_root != new_root:
                changes.append(f"data={new_root.name or 'root'}")
            continue
        if old != new:
            value = "_".join(map(str, new)) if isinstance(new, list) else str(new)
            changes.append(f"{key.removeprefix('probe_')}={value or 'none'}")
    if precision is not None and precision != default_precision:
        changes.append(f"precision={precision}")
    if not changes:
        return "probe.json"
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(changes))
    return f"probe-{stem}.json"


def probe_run(run_dir: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a finished run's backbone; writes and returns the probe's result.

    ``overrides`` may change the evaluation settings only (:data:`care.config.EVALUATION_KEYS`),
    and ``precision``, the precision of the feature extraction (default: the run's, where this
    machine runs it natively; :func:`care.hardware.evaluation_precision`). The result goes to
    ``probe.json`` with the run's own settings and to a file named by the settings that differ
    otherwise (:func:`probe_file_name`); the result's ``file`` says which.
    """
    overrides = dict(overrides or {})
    requested = requested_precision(overrides.pop("precision", None))
    for key in overrides:
        if key not in EVALUATION_KEYS:
            raise CareError(
                f"'{key}' cannot be changed by `care probe`: use one of "
                f"{[*EVALUATION_KEYS, 'precision']}"
            )
    run = RunDir(run_dir)
    saved = run.read_config()
    cfg = with_overrides(saved, overrides)
    train_set, test_set = load_split(cfg, "train"), load_split(cfg, "test")
    if train_set.num_classes < 2:
        raise CareError(
            f"care probe needs labelled images of at least 2 classes, and {cfg.dataset} in "
            f"{resolve_data_root(cfg.dataset, cfg.data_root)} has {train_set.num_classes}: a "
            "probe of one class scores 100% whatever the features; probe a dataset with 2 or "
            "more class folders (data_root=DIR)"
        )
    info = data_info(cfg, train_set)
    backbone = load_trained_encoder(run, cfg, info.channels, "backbone")
    device = evaluation_device(cfg)
    precision = evaluation_precision(cfg.precision, device.type, requested)
    default_precision = evaluation_precision(cfg.precision, device.type)
    memory_format = torch_memory_format(resolve_memory_format("auto", device.type))
    name = Path(run.root).name or str(run.root)
    features = {
        split: extract_features(
            backbone,
            data,
            info,
            device=device,
            precision=precision,
            memory_format=memory_format,
            num_workers=cfg.num_workers,
            description=f"probe {name}: {split} features",
        )
        for split, data in (("train", train_set), ("test", test_set))
    }
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    knn = 100.0 * weighted_knn_accuracy(
        train_x, train_y, test_x, test_y, info.num_classes, cfg.knn_k, cfg.knn_temperature
    )
    linear = linear_probe(
        train_x, train_y, test_x, test_y, info.num_classes, cfg, f"probe {name}: linear probe"
    )
    path = run.root / probe_file_name(saved, cfg, precision, default_precision)
    result = {
        "run": str(run.root),
        "file": str(path),
        "method": cfg.method,
        "views": views_label(cfg),
        "dataset": cfg.dataset,
        "features": {
            "layer": "backbone",
            "precision": precision,
            "dim": int(train_x.shape[1]),
            "train": int(train_x.shape[0]),
            "test": int(test_x.shape[0]),
        },
        "knn": {"accuracy": knn, "k": cfg.knn_k, "temperature": cfg.knn_temperature},
        "linear": asdict(linear),
    }
    atomic_write_json(path, result)
    return result


def method_label(result: dict[str, Any]) -> str:
    views = result.get("views")
    return f"{result['method']} ({views} views)" if views else str(result["method"])


def report_console() -> Console:
    """A rich Console for result tables: the terminal's width on a terminal, and wide enough
    for any table in a file or a pipe (rich would cut it to 80 columns there)."""
    return Console() if sys.stdout.isatty() else Console(width=1000)


def print_results(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """The results table: one row per run."""
    table = Table(title="Linear probe and kNN accuracy (%)")
    for column in ("run", "method", "dataset", "kNN", "kNN bank", "linear probe"):
        right = column in ("kNN", "kNN bank", "linear probe")
        table.add_column(column, justify="right" if right else "left")
    for r in results:
        linear = r["linear"]
        bank = r.get("features", {}).get("train")
        table.add_row(
            r["run"],
            method_label(r),
            r["dataset"],
            f"{r['knn']['accuracy']:.2f}",
            "?" if bank is None else f"{bank:,} train images",
            f"{linear['mean']:.2f} ± {linear['std']:.2f} ({len(linear['per_seed'])} seeds)",
        )
    (console or report_console()).print(table)
