"""What a pretraining tells a person: progress by the clock, clean piped output, the files that
always exist (metrics.csv with a loss row per epoch, summary.json with a step time)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import care.train.callbacks as callbacks
from care.config import load_config
from care.errors import CareError
from care.progress import clock_text
from care.train import pretrain
from care.train.callbacks import KNNMonitor, Progress
from care.train.pretraining import progress_interval
from tests.conftest import tiny

#: Lightning's notices that `care pretrain` silences, and the progress bar it replaced.
SILENCED = (
    "litlogger",
    "Tip:",
    "GPU available",
    "TPU available",
    "limit_val_batches",
    "weights_only",
    "treespec",
    "srun",
    "stepping batches",
    "Validation DataLoader",
    "it/s",
)


NO_MODULE: Any = None  # the progress bar never reads the LightningModule


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _trainer(**values: Any) -> Any:
    defaults = {
        "current_epoch": 0,
        "max_epochs": 2,
        "num_training_batches": 100,
        "global_step": 0,
        "callback_metrics": {},
        "check_val_every_n_epoch": 1,
        "num_val_batches": [10, 5],
        "sanity_checking": False,
    }
    return SimpleNamespace(**{**defaults, **values})


def _run_epoch(bar: Progress, trainer: Any, clock: FakeClock, step_s: float) -> None:
    bar.on_train_epoch_start(trainer, NO_MODULE)
    for batch in range(trainer.num_training_batches):
        clock.now += step_s
        trainer.global_step += 1
        trainer.callback_metrics["train/loss"] = torch.tensor(4.25)
        bar.on_train_batch_end(trainer, NO_MODULE, None, None, batch)


def test_progress_refreshes_by_the_clock_not_by_steps() -> None:
    """100 steps of 0.125 s with a 2-second refresh: the first step, then a line every 16 steps;
    images/s and the ETA of both epochs, not of this one; the kNN passes by name."""
    clock, stream = FakeClock(), io.StringIO()
    knn = KNNMonitor(10, 5, 0.1)
    bar = Progress(256, knn, stream=stream, tty=False, every_s=2.0, clock=clock)
    trainer = _trainer()
    bar.on_train_start(trainer, NO_MODULE)
    _run_epoch(bar, trainer, clock, 0.125)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"epoch 1/2 step {s}/100 ({s}%)" for s in (1, 17, 33, 49, 65, 81, 97)
    ]
    assert "loss 4.2500, 2,048 img/s" in lines[1]  # 256 images per 0.125 s step
    assert lines[1].endswith("ETA 0:23 (whole run)")  # 183 steps left in both epochs
    # the kNN monitor: 0.25 s for each of the bank's 10 batches and the test split's 5
    stream.truncate(0), stream.seek(0)
    bar.on_validation_start(trainer, NO_MODULE)
    for loader, batches in ((0, 10), (1, 5)):
        for batch in range(batches):
            clock.now += 0.25
            bar.on_validation_batch_end(trainer, NO_MODULE, None, None, batch, loader)
    knn.bank_size, knn.test_size = 640, 320
    trainer.callback_metrics["val/knn_acc"] = torch.tensor(42.5)
    bar.on_validation_end(trainer, NO_MODULE)
    bar.on_train_epoch_end(trainer, NO_MODULE)
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["epoch 1/2 kNN bank 7/10", "epoch 1/2 kNN test 5/5"]
    assert lines[2:] == [
        "epoch 1/2 done in 0:16: loss 4.2500, 2,048 img/s, "
        "kNN 42.50% (bank 640, test 320 images), ETA 0:16 (whole run)"  # 12.5 s + one kNN
    ]
    assert all(line.strip() for line in lines) and "\r" not in stream.getvalue()


def test_progress_on_a_terminal_rewrites_one_line_and_ends_it() -> None:
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(32, stream=stream, tty=True, every_s=2.0, clock=clock)
    trainer = _trainer(max_epochs=1, num_training_batches=50)
    bar.on_train_start(trainer, NO_MODULE)
    _run_epoch(bar, trainer, clock, 0.5)
    text = stream.getvalue()
    assert text.count("\r") == 13 and "\n" not in text  # step 1, then every 4 steps (2 s)
    assert "█" in text and "img/s" in text
    bar.on_exception(trainer, NO_MODULE, KeyboardInterrupt())
    assert stream.getvalue().endswith("\n")  # what explains the stop starts a line


def test_disabled_progress_prints_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(32, stream=stream, tty=False, clock=FakeClock())
    bar.disable()
    trainer = _trainer(max_epochs=1, num_training_batches=3)
    bar.on_train_start(trainer, NO_MODULE)
    _run_epoch(bar, trainer, FakeClock(), 1.0)
    bar.on_train_epoch_end(trainer, NO_MODULE)
    assert stream.getvalue() == ""


def test_clock_text() -> None:
    assert [clock_text(s) for s in (7, 123, 3723.4)] == ["0:07", "2:03", "1:02:03"]


def test_a_two_step_run_has_a_loss_row_and_a_step_time(fake_fmnist: Path, tmp_path: Path) -> None:
    """2 steps, fewer than log_every and than Throughput's warm-up, and no kNN monitor."""
    settings = ("train_samples=64", "knn_every=0", "log_every=20")
    run = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", *settings)))
    with run.metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "2")] and rows[0]["train/loss"]
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 2 and summary["step_time_s"] > 0
    assert summary["timed_steps"] == 2 and summary["step_time_over"].startswith("all steps")
    assert summary["final_knn_acc_percent"] is None and summary["knn_bank_size"] is None


def _piped(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "care.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_piped_pretrain_prints_clean_lines_and_what_comes_next(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    """Through pipes: no carriage returns or blank lines, none of Lightning's notices (a fake
    `srun` on PATH would draw its SLURM hint), one line per epoch, then the run's files and the
    commands that come next."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "run"
    done = _piped(["pretrain", *tiny(fake_fmnist, out, "epochs=2", "log_every=20")], env)
    assert done.returncode == 0, done.stderr[-2000:]
    for stream in (done.stdout, done.stderr):
        assert "\r" not in stream and "\x1b" not in stream
        assert all(line.strip() for line in stream.splitlines()), stream
        for notice in SILENCED:
            assert notice not in stream, (notice, stream)
    lines = done.stdout.splitlines()
    epochs = [line for line in lines if " done in " in line]
    assert [line.split(" done")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "img/s" in epochs[0] and "kNN" in epochs[0] and "(bank 64, test 64 images)" in epochs[0]
    written = next(i for i, line in enumerate(lines) if line.startswith("run written to"))
    assert "backbone.safetensors" in lines[written] and "summary.json" in lines[written]
    assert "online kNN" in lines[written + 1] and "bank 64 training images" in lines[written + 1]
    assert lines[written + 2] == "next:"
    commands = [line.split("#")[0].strip() for line in lines[written + 3 :]]
    assert commands == [
        f"care probe {out}",
        f"care equivariance {out} --against SIMCLR_RUN",
        f"care embed {out} out={out / 'embeddings.safetensors'}",
    ]


def test_interrupted_pretrain_says_what_it_saved_and_how_to_continue(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    """SIGTERM after the first progress line: the checkpoint's path and the same command with
    resume=true, which then finishes the run."""
    out = tmp_path / "run"
    args = ["pretrain", *tiny(fake_fmnist, out, "epochs=6", "knn_every=0"), "resume=false"]
    process = subprocess.Popen(
        [sys.executable, "-m", "care.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()  # the first step's line
    assert first.startswith("epoch 1/6 step 1/4"), first
    process.send_signal(signal.SIGTERM)
    rest, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert lines[-3] == f"saved {out / 'checkpoints' / 'last.ckpt'} (and metrics.csv)"
    command = [*args[:-1], "resume=true"]  # resume=false is replaced
    assert lines[-2] == "continue with: care " + " ".join(
        f"'{a}'" if "[" in a else a for a in command
    )
    assert lines[-1].startswith("stopped at step ") and lines[-1].endswith("resume=true")
    assert all(line.strip() for line in (first + rest).splitlines())
    done = _piped(command)  # from mid-epoch: the epoch's time counts from the resume
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6 * 4
    epochs = [line for line in done.stdout.splitlines() if " done in " in line]
    assert len(epochs) == 6 and all(" done in 0:0" in line for line in epochs), epochs


def test_care_progress_s_sets_the_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARE_PROGRESS_S", raising=False)
    assert progress_interval() is None
    monkeypatch.setenv("CARE_PROGRESS_S", "0")
    assert progress_interval() == 0.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("CARE_PROGRESS_S", bad)
        with pytest.raises(CareError, match="CARE_PROGRESS_S"):
            progress_interval()


def test_knn_every_steps_checks_across_epochs_and_rows_carry_training_seconds(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    """4 steps per epoch, 2 epochs, a check every 3 steps: at steps 3 and 6 (inside epoch 1),
    not at the epoch ends; time_s never goes back."""
    settings = ("epochs=2", "knn_every=0", "knn_every_steps=3", "log_every=20")
    run = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "r", *settings)))
    with run.metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    checks = [(int(r["epoch"]), int(r["step"])) for r in rows if r.get("val/knn_acc")]
    assert checks == [(0, 3), (1, 6)]
    seconds = [float(r["time_s"]) for r in rows]
    assert all(s > 0 for s in seconds) and seconds == sorted(seconds)
    assert json.loads(run.summary.read_text())["final_knn_acc_percent"] is not None


def test_metrics_time_excludes_validation_and_counts_on_after_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    path = tmp_path / "metrics.csv"
    # an earlier attempt: rows up to step 4 survive the restore, the one at step 6 does not
    path.write_text("epoch,step,time_s,train/loss\n0,2,5.0,1.0\n0,4,7.5,0.9\n0,6,99.0,0.8\n")
    logger = callbacks.MetricsCSV(path, every=2)
    trainer = _trainer(global_step=4, num_training_batches=10)
    logger.on_train_start(trainer, NO_MODULE)
    now[0] += 2.0  # two seconds of training
    logger.on_validation_start(trainer, NO_MODULE)
    now[0] += 30.0  # the kNN check itself
    trainer.callback_metrics = {"val/knn_acc": torch.tensor(50.0)}
    logger.on_validation_end(trainer, NO_MODULE)
    now[0] += 1.0
    trainer.global_step = 6
    trainer.callback_metrics = {"train/loss": torch.tensor(0.7)}
    logger.on_train_batch_end(trainer, NO_MODULE, None, None, 5)
    assert [(r["step"], float(r["time_s"])) for r in logger.rows] == [
        ("2", 5.0),
        ("4", 7.5),
        (4, 9.5),
        (6, 10.5),
    ]


def test_a_loss_from_an_earlier_step_is_labelled_with_its_step() -> None:
    """With log_every longer than an epoch, the loss shown in epoch 2 is epoch 1's last: it says
    so, and a loss of the shown step needs no label."""
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(32, stream=stream, tty=False, every_s=0.0, clock=clock, log_every=50)
    trainer = _trainer(num_training_batches=4)
    bar.on_train_start(trainer, NO_MODULE)
    for epoch in range(2):
        trainer.current_epoch = epoch
        bar.on_train_epoch_start(trainer, NO_MODULE)
        for batch in range(4):
            clock.now += 1.0
            trainer.global_step += 1
            if batch == 3:  # the methods log at an epoch's last step (and every 50 steps)
                trainer.callback_metrics["train/loss"] = torch.tensor(5.4585 - epoch)
            bar.on_train_batch_end(trainer, NO_MODULE, None, None, batch)
        bar.on_train_epoch_end(trainer, NO_MODULE)
    lines = stream.getvalue().splitlines()
    second = [line for line in lines if line.startswith("epoch 2/2 step 1/4")]
    assert "loss 5.4585 (epoch 1 step 4)" in second[0]
    last = [line for line in lines if line.startswith("epoch 2/2 step 4/4")]
    assert "loss 4.4585," in last[0]  # the shown step's own loss: no label


def test_a_signal_ends_the_open_progress_line_first(tmp_path: Path) -> None:
    """The handler's message starts on a line of its own, not glued to the bar."""
    path = tmp_path / "tty"
    with path.open("w") as stream:
        bar = Progress(32, stream=stream, tty=True, every_s=0.0, clock=FakeClock())
        trainer = _trainer(num_training_batches=4)
        bar.on_train_start(trainer, NO_MODULE)
        trainer.global_step = 1
        bar.on_train_batch_end(trainer, NO_MODULE, None, None, 0)
        bar.end_line_now()  # what LastCheckpoint's signal handler calls
        bar.end_line_now()  # once only
        bar.on_exception(trainer, NO_MODULE, RuntimeError())  # nothing more to end
    text = path.read_bytes()
    assert text.startswith(b"\repoch 1/2") and text.endswith(b"\x1b[K\n")
    assert text.count(b"\n") == 1


def test_the_stop_message_counts_epochs_as_the_bar_does() -> None:
    from care.errors import RunInterrupted

    stop = RunInterrupted(12, 2, signal.SIGINT, 2)
    assert str(stop) == "stopped at step 12 (epoch 2/2): resume with resume=true"
    assert stop.exit_status == 130
