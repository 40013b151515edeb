"""torchrun inside a SLURM job: the ranks come from torchrun, not from SLURM's one task.

A batch job of one task (``sbatch --ntasks-per-node=1``) that runs ``torchrun
--nproc_per_node=2 -m care pretrain devices=2 strategy=ddp`` leaves SLURM's variables in every
rank's environment. Lightning's own order takes torchrun's (TorchElasticEnvironment) first; care
handed it SLURM's environment whenever SLURM was detected, and every rank failed with
``ValueError: You set devices=2 in Lightning, but the number of tasks per node configured in
SLURM --ntasks-per-node=1 does not match``. Here the SLURM job is simulated by its variables.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from care.config import load_config
from care.runs import RunDir
from care.train.pretraining import build_trainer, cluster_plugins
from tests.conftest import tiny

TIMEOUT_S = 240  # one torchrun launch (2 ranks); a few seconds each when the CPUs are free

# What `sbatch --nodes=1 --ntasks-per-node=1` sets in the batch script's environment (what
# Lightning's SLURMEnvironment reads, and a few more). The job name is not bash/interactive,
# which Lightning takes for an interactive allocation and ignores.
SLURM_BATCH_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOBID": "4242",
    "SLURM_JOB_NAME": "care-pretrain",
    "SLURM_NTASKS": "1",
    "SLURM_NPROCS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_GTIDS": "0",
    "SLURM_NODELIST": "node001",
    "SLURM_JOB_NODELIST": "node001",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_CLUSTER_NAME": "cluster",
}

# What torchrun sets in each worker's environment (TorchElasticEnvironment.detect() reads
# TORCHELASTIC_RUN_ID; its ranks come from the others).
TORCHRUN_WORKER = {
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "ROLE_RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}

LAUNCHER_VARIABLES = {*TORCHRUN_WORKER, "NODE_RANK", "TORCHELASTIC_RESTART_COUNT"}


def _is_launcher_variable(name: str) -> bool:
    return name.startswith(("SLURM_", "TORCHELASTIC_")) or name in LAUNCHER_VARIABLES


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SLURM or torchrun variable of the machine the tests run on (a CI job under SLURM)."""
    for name in [n for n in os.environ if _is_launcher_variable(n)]:
        monkeypatch.delenv(name)
    return monkeypatch


def _set(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_a_slurm_task_gets_slurms_environment_without_lightnings_requeue(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    _set(clean_environment, SLURM_BATCH_JOB)
    plugins = cluster_plugins()
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment)
    assert plugins[0].auto_requeue is False  # care requeues itself, after its checkpoint


def test_torchrun_inside_a_slurm_job_gets_no_slurm_environment(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    _set(clean_environment, {**SLURM_BATCH_JOB, **TORCHRUN_WORKER})
    assert SLURMEnvironment.detect() and TorchElasticEnvironment.detect()  # both look present
    assert cluster_plugins() == []


@pytest.mark.parametrize(
    "variables",
    [{}, TORCHRUN_WORKER, {**SLURM_BATCH_JOB, "SLURM_JOB_NAME": "interactive"}],
    ids=["neither", "torchrun-only", "interactive-allocation"],
)
def test_no_cluster_environment_outside_a_slurm_task(
    variables: dict[str, str], clean_environment: pytest.MonkeyPatch
) -> None:
    _set(clean_environment, variables)
    assert cluster_plugins() == []


def test_the_trainer_takes_torchruns_ranks_inside_a_slurm_job(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In process, rank 0's view: the Trainer reads its ranks from torchrun's environment, a
    world of 2 (the old code handed it SLURM's, of 1 task, which refused devices=2 at fit)."""
    _set(clean_environment, {**SLURM_BATCH_JOB, **TORCHRUN_WORKER})
    cfg = load_config(None, tiny(tmp_path, tmp_path / "run", "devices=2", "strategy=ddp"))
    trainer = build_trainer(cfg, RunDir(cfg.out), [])
    environment = trainer.strategy.cluster_environment  # type: ignore[attr-defined]
    assert isinstance(environment, TorchElasticEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.num_nodes) == (2, 0, 1)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc; none elsewhere). torchrun starts each worker in
    a session of its own, so killing torchrun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(process: subprocess.Popen[str]) -> None:
    """SIGKILL torchrun, its workers and theirs (each worker leads a process group)."""
    below = _descendants(process.pid)
    for pid in [process.pid, *below]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def torchrun_in_slurm_job(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=2 --standalone -m care pretrain ARGS`` in the environment of
    a one-task SLURM batch job; killed with all its workers if it runs past TIMEOUT_S."""
    env = {k: v for k, v in os.environ.items() if not _is_launcher_variable(k)}
    env.update(SLURM_BATCH_JOB, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--standalone", "-m", "care", "pretrain", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_all(process)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a pipe still held open: give up on the output
            process.kill()
            out, err = "", ""
        pytest.fail(f"torchrun ran past {TIMEOUT_S} s and was killed:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _logged_steps(run: RunDir) -> list[int]:
    with run.metrics.open() as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]


def test_torchrun_inside_a_slurm_job_trains_on_two_ranks_and_resumes(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    run = RunDir(tmp_path / "run")
    args = tiny(fake_fmnist, run.root, "devices=2", "strategy=ddp", "batch_size=16")
    args += ["knn_every=0", "loggers=[csv]"]
    done = torchrun_in_slurm_job(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ntasks-per-node" not in done.stderr
    assert run.backbone.is_file() and run.last_checkpoint.is_file()
    summary = json.loads(run.summary.read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert (summary["epochs"], summary["steps"]) == (1, 128 // 32)
    assert done.stdout.count("run written to") == 1  # rank 0 alone reports and writes

    resumed = torchrun_in_slurm_job([*args, "resume=true", "epochs=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(run.summary.read_text())
    assert summary["world_size"] == 2
    assert (summary["epochs"], summary["steps"]) == (2, 2 * 128 // 32)
    steps = _logged_steps(run)  # continued from the checkpoint, not started again
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 128 // 32, steps
