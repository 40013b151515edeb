"""`care probe RUN_DIR`: frozen-backbone linear probe (3 seeds) and weighted kNN → probe.json.

Protocol (paper, Appendix G): a linear classifier on frozen backbone features, trained with Adam
(lr 1e-3, weight decay 1e-6). Features are extracted once from un-augmented images and
standardised with the training set's mean and std (an affine map, so the probe stays linear);
the reported accuracy is the test accuracy after the last epoch, with no model selection on test.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor, nn

from care.config import Config, validate
from care.evaluate.features import extract_features
from care.evaluate.knn import weighted_knn_accuracy
from care.models import ResNet
from care.runs import RunDir, atomic_write_json, load_weights
from care.train import data_info, load_split

PROBE_KEYS = (
    "probe_epochs",
    "probe_seeds",
    "probe_lr",
    "probe_weight_decay",
    "probe_batch_size",
    "knn_k",
    "knn_temperature",
    "data_root",
    "accelerator",
)


@dataclass(frozen=True)
class ProbeResult:
    mean: float
    std: float
    per_seed: list[float]
    epochs: int
    lr: float
    weight_decay: float


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
) -> float:
    """Test accuracy (in [0, 1]) of a linear classifier trained with Adam on fixed features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    labels = train_y.long()
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(classifier(train_x[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = classifier(test_x).argmax(1)
    return (predicted == test_y.long()).float().mean().item()


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, cfg: Config
) -> ProbeResult:
    """The probe over ``cfg.probe_seeds`` seeds: mean ± std of test accuracy (in %)."""
    accuracies: list[float] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("linear probe", total=cfg.probe_seeds)
        for seed in range(cfg.probe_seeds):
            accuracy = train_linear_probe(
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes,
                epochs=cfg.probe_epochs,
                lr=cfg.probe_lr,
                weight_decay=cfg.probe_weight_decay,
                batch_size=cfg.probe_batch_size,
                seed=seed,
            )
            accuracies.append(100.0 * accuracy)
            progress.advance(task)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return ProbeResult(
        statistics.fmean(accuracies),
        std,
        accuracies,
        cfg.probe_epochs,
        cfg.probe_lr,
        cfg.probe_weight_decay,
    )


def _device(cfg: Config) -> torch.device:
    if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def probe_run(run_dir: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a finished run's backbone; writes and returns ``probe.json``'s content."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    validate(cfg)
    train_set, test_set = load_split(cfg, "train"), load_split(cfg, "test")
    info = data_info(cfg, train_set)
    backbone = ResNet(cfg.backbone, in_channels=info.channels, stem=cfg.stem, widths=cfg.widths)
    load_weights(backbone, run.backbone)
    device = _device(cfg)
    train_x, train_y = extract_features(
        backbone, train_set, info, device=device, description="train features"
    )
    test_x, test_y = extract_features(
        backbone, test_set, info, device=device, description="test features"
    )
    knn = 100.0 * weighted_knn_accuracy(
        train_x, train_y, test_x, test_y, info.num_classes, cfg.knn_k, cfg.knn_temperature
    )
    linear = linear_probe(train_x, train_y, test_x, test_y, info.num_classes, cfg)
    result = {
        "run": str(run.root),
        "method": cfg.method,
        "views": cfg.views if cfg.grouped else None,
        "dataset": cfg.dataset,
        "features": {
            "layer": "backbone",
            "dim": int(train_x.shape[1]),
            "train": int(train_x.shape[0]),
            "test": int(test_x.shape[0]),
        },
        "knn": {"accuracy": knn, "k": cfg.knn_k, "temperature": cfg.knn_temperature},
        "linear": asdict(linear),
    }
    atomic_write_json(run.root / "probe.json", result)
    return result


def method_label(result: dict[str, Any]) -> str:
    views = result.get("views")
    return f"{result['method']} ({views} views)" if views else str(result["method"])


def print_results(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """The results table: one row per run."""
    table = Table(title="Linear probe and kNN accuracy (%)")
    for column in ("run", "method", "dataset", "kNN", "linear probe"):
        table.add_column(column, justify="right" if column in ("kNN", "linear probe") else "left")
    for r in results:
        linear = r["linear"]
        table.add_row(
            r["run"],
            method_label(r),
            r["dataset"],
            f"{r['knn']['accuracy']:.2f}",
            f"{linear['mean']:.2f} ± {linear['std']:.2f} ({len(linear['per_seed'])} seeds)",
        )
    (console or Console()).print(table)
