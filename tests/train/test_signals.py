"""Real signals to a real `care pretrain` process on Fashion-MNIST: it finishes the step, writes
last.ckpt, says how to resume, exits non-zero, and the resumed run ends with the weights of an
uninterrupted one. (`make data` installs the real Fashion-MNIST these runs read.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from care.runs import safe_torch_load

STOPPED = re.compile(r"^stopped at step (\d+) \(epoch (\d+)/\d+\): resume with resume=true$")
STEPS = 2 * 512 // 32  # epochs × steps per epoch


def command(out: Path, *extra: str) -> list[str]:
    settings = [
        f"out={out}",
        "method=simclr",
        "widths=[4,4,8,8]",
        "head_hidden=16",
        "head_out=8",
        "batch_size=32",
        "train_samples=512",
        "epochs=2",
        "knn_every=0",
        "precision=32",
        "accelerator=cpu",
        "log_every=1",
        "checkpoint_every_steps=5",
    ]
    return [sys.executable, "-m", "care", "pretrain", *settings, *extra]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def interrupt(
    out: Path, signals: list[signal.Signals], *extra: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Start a run, wait for its first checkpoint (step 5), send ``signals`` to its process
    group (as a terminal or SLURM does, workers included); its exit status and stderr."""
    process = subprocess.Popen(
        command(out, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or environment(),
        start_new_session=True,
    )
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the signal"
    for signum in signals:
        os.killpg(process.pid, signum)
        time.sleep(0.01)
    _, err = process.communicate(timeout=180)
    return process.returncode, err


def stopped_at(err: str) -> tuple[int, int]:
    """The step and epoch of the one line that says where the run stopped (stderr's last)."""
    assert "Traceback" not in err, err[-3000:]
    match = STOPPED.match(err.strip().splitlines()[-1])
    assert match, err[-2000:]
    return int(match.group(1)), int(match.group(2))


def resume(out: Path, *extra: str) -> None:
    done = subprocess.run(
        [*command(out, *extra), "resume=true"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the interrupted ones must end equal to."""
    out = tmp_path_factory.mktemp("signals") / "straight"
    done = subprocess.run(
        command(out), capture_output=True, text=True, env=environment(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sigterm_stops_after_the_step_and_the_resumed_run_ends_the_same(
    straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    status, err = interrupt(out, [signal.SIGTERM])
    assert status == 128 + signal.SIGTERM
    step, epoch = stopped_at(err)
    assert 5 <= step < STEPS and epoch == (step - 1) // (STEPS // 2) + 1  # counted from 1
    saved = safe_torch_load(out / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == step  # nothing since the signal is lost
    assert not (out / "summary.json").exists()
    resume(out)
    same_weights(straight / "backbone.safetensors", out / "backbone.safetensors")
    same_weights(straight / "head.safetensors", out / "head.safetensors")


def test_ctrl_c_twice_with_loader_workers_saves_once_and_resumes(
    straight: Path, tmp_path: Path
) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C reaches the loader workers too),
    twice in a row (tests/train/test_checkpoints.py sends one during the save itself)."""
    out = tmp_path / "run"
    status, err = interrupt(out, [signal.SIGINT, signal.SIGINT], "num_workers=2")
    assert status == 128 + signal.SIGINT
    step, _ = stopped_at(err)
    assert safe_torch_load(out / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not list(out.rglob("*.tmp"))
    resume(out, "num_workers=2")
    same_weights(straight / "backbone.safetensors", out / "backbone.safetensors")


def test_sigusr1_under_slurm_saves_and_requeues_the_job(tmp_path: Path) -> None:
    """`#SBATCH --signal=USR1@90`: a fake `scontrol` on PATH records the requeue it is asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "care-test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    out = tmp_path / "run"
    status, err = interrupt(out, [signal.SIGUSR1], env=environment(**slurm))
    assert status == 128 + signal.SIGUSR1
    step, _ = stopped_at(err)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in err
    assert safe_torch_load(out / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not list(out.glob("hpc_ckpt*")) and not list(out.rglob("hpc_ckpt*"))


def test_a_second_run_into_a_live_runs_folder_is_refused_until_it_dies(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(
        command(out, "epochs=20"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        start_new_session=True,
    )
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        [*command(out, "epochs=20"), "resume=true"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert first.poll() is None, "the first run ended before the second started"
    os.killpg(first.pid, signal.SIGKILL)  # leaves its lock behind
    first.wait()
    assert second.returncode == 2
    line = second.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    assert f"is in use by care pretrain (pid {first.pid} on host" in line, line
    assert (out / ".care.lock").is_file()
    killed_at = safe_torch_load(checkpoint)["global_step"]
    mtime = checkpoint.stat().st_mtime_ns
    resumed = subprocess.Popen(  # the stale lock does not block resume=true
        [*command(out, "epochs=20"), "resume=true"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while checkpoint.stat().st_mtime_ns == mtime and resumed.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(resumed.pid, signal.SIGTERM)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 128 + signal.SIGTERM, err[-2000:]
    step, _ = stopped_at(err)
    assert step > killed_at
    assert not (out / ".care.lock").exists()  # released on the way out
