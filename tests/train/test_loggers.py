"""Optional loggers: Weights & Biases in its offline mode (no account, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from care.config import load_config
from care.errors import CareError
from care.train import pretrain
from tests.conftest import tiny


def test_wandb_logs_offline_and_a_resumed_run_continues_its_run(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    settings = tiny(fake_fmnist, out, "loggers=[csv,tensorboard,wandb]")
    run = pretrain(load_config(None, settings))
    run_id = (out / "wandb-id").read_text().strip()
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = first.read_bytes()
    for key in (b"train/loss", b"train/lr", b"val/knn_acc"):  # history keys, as logged
        assert key in records, key
    assert run.metrics.is_file() and (out / "tensorboard").is_dir()
    pretrain(load_config(None, [*settings, "epochs=2", "resume=true"]))
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert (out / "wandb-id").read_text().strip() == run_id  # the same W&B run goes on


def test_metrics_csv_alone_needs_no_logger(fake_fmnist: Path, tmp_path: Path) -> None:
    run = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", "loggers=[csv]")))
    assert run.metrics.is_file() and not (run.root / "tensorboard").exists()


def test_an_unknown_logger_is_one_line(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(CareError, match=r"bad value for 'loggers': \['mlflow'\]"):
        load_config(None, tiny(fake_fmnist, tmp_path / "r", "loggers=[csv,mlflow]"))
