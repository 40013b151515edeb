"""The linear probe's optimiser and lr schedule: Adam or SGD, lr × 0.1 at each milestone epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from care.cli import main
from care.config import Config
from care.data import data_info, load_split
from care.evaluate import probe
from care.evaluate.features import extract_features
from care.evaluate.probe import probe_lr_at, train_linear_probe, train_linear_probes
from care.hardware import evaluation_device
from care.runs import RunDir, load_trained_encoder
from tests.conftest import tiny


def test_lr_at_each_epoch_of_the_imagenet100_schedule() -> None:
    lrs = [probe_lr_at(e, 30.0, [30, 40, 50]) for e in range(60)]
    assert lrs[:30] == [30.0] * 30
    assert lrs[30:40] == pytest.approx([3.0] * 10)
    assert lrs[40:50] == pytest.approx([0.3] * 10)
    assert lrs[50:] == pytest.approx([0.03] * 10)


def test_no_milestones_is_a_constant_lr() -> None:
    assert [probe_lr_at(e, 1e-3, []) for e in range(5)] == [1e-3] * 5
    assert probe_lr_at(7, 2.0, [3, 3]) == pytest.approx(0.02)  # a repeated milestone drops twice


def _features(n: int = 24, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=gen), torch.arange(n) % 3


def _record_steps(
    monkeypatch: pytest.MonkeyPatch, cls: type[torch.optim.Optimizer]
) -> list[tuple[torch.optim.Optimizer, float]]:
    """Patch ``cls.step`` to record (optimiser, lr) at every step."""
    seen: list[tuple[torch.optim.Optimizer, float]] = []
    original: Any = cls.step

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        seen.append((self, float(self.param_groups[0]["lr"])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)
    return seen


def test_sgd_probe_follows_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _features()
    seen = _record_steps(monkeypatch, torch.optim.SGD)
    accuracy = train_linear_probe(
        x,
        y,
        x,
        y,
        3,
        epochs=6,
        lr=0.5,
        weight_decay=1e-4,
        batch_size=12,
        optimizer="sgd",
        milestones=[2, 4],
    )
    assert 0.0 <= accuracy <= 1.0
    assert [lr for _, lr in seen] == pytest.approx([0.5] * 4 + [0.05] * 4 + [0.005] * 4)
    optimizer = seen[0][0]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, False, 1e-4)


def test_adam_probe_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _features()
    seen = _record_steps(monkeypatch, torch.optim.Adam)
    train_linear_probe(x, y, x, y, 3, epochs=3, lr=1e-3, weight_decay=1e-6, batch_size=24)
    assert [lr for _, lr in seen] == [1e-3] * 3
    assert isinstance(seen[0][0], torch.optim.Adam)
    assert seen[0][0].param_groups[0]["weight_decay"] == 1e-6


def _reference_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    seed: int,
    opt: str,
) -> tuple[float, torch.Tensor]:
    """One seed's probe as a plain loop: nn.Linear, torch's optimiser, mean cross-entropy."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, test_x = (x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], 4, dtype=x.dtype)
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=1e-3)
        if opt == "adam"
        else torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    )
    for _ in range(4):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(order), 16):
            idx = order[start : start + 16]
            loss = torch.nn.functional.cross_entropy(layer(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (layer(test_x).argmax(1) == test_y).double().mean().item()
    return accuracy, layer.weight.detach()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_seeds_trained_side_by_side_each_train_as_alone(optimizer: str) -> None:
    """Three seeds in one batched probe give each seed's plain-loop accuracy (float64), on
    noisy labels where the seeds disagree, so mixing their batches or their losses would show."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(90, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(90, generator=gen, dtype=torch.float64) > 0).long()
    y = y + 2 * (x[:, 1] > 0).long()
    test_x, test_y = x[60:], y[60:]
    settings = {"epochs": 4, "lr": 0.05, "weight_decay": 1e-3, "batch_size": 16}
    batched = train_linear_probes(
        x[:60], y[:60], test_x, test_y, 4, seeds=[0, 1, 2], optimizer=optimizer, **settings
    )
    expected = [_reference_probe(x[:60], y[:60], test_x, test_y, s, optimizer)[0] for s in range(3)]
    assert batched == expected
    assert len(set(expected)) > 1  # the seeds do differ
    alone = [
        train_linear_probe(
            x[:60], y[:60], test_x, test_y, 4, seed=s, optimizer=optimizer, **settings
        )
        for s in range(3)
    ]
    assert alone == expected


@pytest.fixture(scope="module")
def tiny_run(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out, "method=simclr", "knn_every=0")]) == 0
    return out


def test_care_probe_with_sgd_and_milestones_records_them(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["probe", str(tiny_run), "probe_optimizer=sgd", "probe_lr=30", "probe_seeds=1"]
    assert main([*argv, "probe_milestones=[1,2]", "probe_epochs=3"]) == 0
    sgd = tiny_run / "probe-epochs=3-seeds=1-optimizer=sgd-lr=30.0-milestones=1_2.json"
    assert capsys.readouterr().out.strip().endswith(f"wrote {sgd}")
    linear = json.loads(sgd.read_text())["linear"]
    assert linear["optimizer"] == "sgd" and linear["momentum"] == 0.9
    assert linear["milestones"] == [1, 2] and linear["lr"] == 30.0 and linear["epochs"] == 3
    assert len(linear["per_seed"]) == 1
    assert main(["probe", str(tiny_run), "probe_epochs=1", "probe_seeds=1"]) == 0
    linear = json.loads((tiny_run / "probe-epochs=1-seeds=1.json").read_text())["linear"]
    assert (linear["optimizer"], linear["milestones"], linear["momentum"]) == ("adam", [], None)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("probe_optimizer=lbfgs", "choose one of ['adam', 'sgd']"),
        ("probe_milestones=[0,3]", "'probe_milestones'"),
        ("probe_milestones=30", "probe_milestones"),
        ("probe_milestones=[a]", "probe_milestones"),
    ],
)
def test_bad_probe_settings_fail_in_one_line(
    tiny_run: Path, capsys: pytest.CaptureFixture[str], setting: str, fragment: str
) -> None:
    assert main(["probe", str(tiny_run), setting, "probe_epochs=1", "probe_seeds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err


# ------------------------------------------------------------- feature extraction


def test_feature_workers_give_the_same_features(tiny_run: Path) -> None:
    run = RunDir(tiny_run)
    cfg = run.read_config()
    data = load_split(cfg, "test")
    info = data_info(cfg, data)
    backbone = load_trained_encoder(run, cfg, info.channels, "backbone")
    settings: dict[str, Any] = {"batch_size": 24, "device": evaluation_device(cfg)}  # 24 ∤ 64
    x0, y0 = extract_features(backbone, data, info, num_workers=0, **settings)
    x2, y2 = extract_features(backbone, data, info, num_workers=2, **settings)
    assert x0.shape == (len(data), 8)
    assert y0.tolist() == [data[i][1] for i in range(len(data))]
    assert torch.equal(x2, x0) and torch.equal(y2, y0)


def test_care_probe_reads_with_the_runs_workers(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("num_workers: 0", "num_workers: 2"))
    seen: list[int] = []

    def recording(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(kwargs["num_workers"])
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(probe, "extract_features", recording)
    assert main(["probe", str(run), "probe_epochs=1", "probe_seeds=1"]) == 0
    assert seen == [2, 2]  # train and test features
    assert main(["probe", str(run), "probe_epochs=1", "probe_seeds=1", "num_workers=1"]) == 0
    assert seen == [2, 2, 1, 1]  # the command line overrides the run's
    assert main(["probe", str(tiny_run), "probe_epochs=1", "probe_seeds=1"]) == 0
    with_workers = json.loads((run / "probe-epochs=1-seeds=1.json").read_text())
    without = json.loads((tiny_run / "probe-epochs=1-seeds=1.json").read_text())
    assert with_workers["knn"] == without["knn"]
    assert with_workers["linear"] == without["linear"]


def test_evaluation_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device(Config(accelerator="auto")) == torch.device("cpu")
    assert evaluation_device(Config(accelerator="gpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for accelerator in ("auto", "gpu", "cuda"):
        assert evaluation_device(Config(accelerator=accelerator)) == torch.device("cuda")
    assert evaluation_device(Config(accelerator="cpu")) == torch.device("cpu")
    assert evaluation_device(Config(accelerator="mps")) == torch.device("cpu")
