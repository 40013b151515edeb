"""Pretraining end to end on a tiny IDX dataset: files, resume, determinism."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from care.config import load_config
from care.errors import CareError
from care.evaluate.probe import probe_run
from care.train import pretrain
from tests.conftest import tiny


@pytest.mark.parametrize(
    "extra",
    [
        ("method=simclr",),
        ("method=care", "views=separate"),
        ("method=care", "views=shared"),
        ("method=equi_unif",),
        ("method=care", "pairs=per_batch"),
    ],
)
def test_pretrain_writes_a_complete_run(
    fake_fmnist: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    run = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "run", *extra)))
    for path in (
        run.config,
        run.last_checkpoint,
        run.best_checkpoint,
        run.backbone,
        run.head,
        run.metrics,
        run.summary,
    ):
        assert path.is_file(), path
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 128 // 32
    assert 0.0 <= summary["final_knn_acc_percent"] <= 100.0
    assert (summary["knn_bank_size"], summary["knn_test_size"]) == (64, 64)
    header = run.metrics.read_text().splitlines()[0]
    assert "train/loss" in header and "val/knn_acc" in header
    assert not [p for p in run.root.rglob("*.tmp")]
    result = probe_run(str(run.root))
    assert 0.0 <= result["linear"]["mean"] <= 100.0
    assert len(result["linear"]["per_seed"]) == 2
    assert (run.root / "probe.json").is_file()


def test_train_samples_limits_the_steps(fake_fmnist: Path, tmp_path: Path) -> None:
    run = pretrain(
        load_config(None, tiny(fake_fmnist, tmp_path / "r", "train_samples=64", "knn_every=0"))
    )
    assert json.loads(run.summary.read_text())["steps"] == 2
    assert not run.best_checkpoint.exists()


def test_run_killed_with_sigkill_resumes_to_the_same_weights(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    settings = tiny(fake_fmnist, tmp_path / "killed", "epochs=4", "knn_every=0")
    process = subprocess.Popen(
        [sys.executable, "-m", "care.cli", "pretrain", *settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    assert not (tmp_path / "killed" / "backbone.safetensors").exists()  # it died mid-run
    resumed = pretrain(load_config(None, [*settings, "resume=true"]))
    straight = pretrain(
        load_config(None, tiny(fake_fmnist, tmp_path / "straight", "epochs=4", "knn_every=0"))
    )
    assert json.loads(resumed.summary.read_text())["steps"] == 16
    a, b = load_file(str(straight.backbone)), load_file(str(resumed.backbone))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_existing_run_needs_resume(fake_fmnist: Path, tmp_path: Path) -> None:
    pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r")))
    with pytest.raises(CareError, match="resume=true"):
        pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r")))
    with pytest.raises(CareError, match="different 'lr'"):
        pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", "resume=true", "lr=0.5")))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, native: bool
) -> None:
    monkeypatch.setattr("care.train.pretraining.cpu_has_native_bf16", lambda: native)
    run = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", "precision=bf16-mixed")))
    assert run.summary.is_file()
    warned = "precision=bf16-mixed on a CPU without avx512_bf16" in capsys.readouterr().err
    assert warned is not native


def test_too_few_images_for_a_batch(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(CareError, match="fewer than one global batch"):
        pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", "train_samples=16")))


def _lrs(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open(newline="") as handle:
        return {
            int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(handle) if r["train/lr"]
        }


def test_more_epochs_on_resume_follow_the_longer_schedule(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    """A finished 2-epoch cosine run resumed with epochs=3 trains its third epoch at the lr a
    3-epoch run has there (not at 0); fewer epochs than it has trained are refused."""
    settings = ("knn_every=0", "log_every=1")
    pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", "epochs=2", *settings)))
    with pytest.raises(CareError, match="has trained 2 epoch"):
        pretrain(
            load_config(
                None, tiny(fake_fmnist, tmp_path / "r", "epochs=1", "resume=true", *settings)
            )
        )
    pretrain(
        load_config(None, tiny(fake_fmnist, tmp_path / "r", "epochs=3", "resume=true", *settings))
    )
    pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "s", "epochs=3", *settings)))
    extended, straight = _lrs(tmp_path / "r"), _lrs(tmp_path / "s")
    assert sorted(extended) == list(range(1, 13))
    for step in range(9, 13):  # the added epoch
        assert extended[step] == pytest.approx(straight[step], rel=1e-9, abs=1e-12)
    assert extended[9] > 1e-4
