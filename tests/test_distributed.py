"""Two CPU processes (gloo) against one: same loss, same gradients, same MoCo queue.

The single process sees the global batch of 2n images; each of the two ranks sees its n images
(the same augmented views, sliced by rank) and DDP's semantics are reproduced by averaging the
gradients over ranks. BatchNorm runs in eval mode here because torch's SyncBatchNorm has no CPU
kernel, and per-device batch statistics would differ from global ones by design; what is under
test is the cross-rank loss: gathered negatives, their gradient scale, groups and the queue.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from care.config import load_config
from care.data import DataInfo
from care.distributed import gather_with_grad
from care.methods import MoCo, ViewPair, Views, build_method
from tests.conftest import tiny

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)
N_GLOBAL = 16  # images in the global batch; 8 per rank
TOLERANCE = 1e-10  # float64 throughout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(method_name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The same weights and views on every process (seeded), in float64, BN in eval mode."""
    extra = ["views=separate", "group_size=4", "queue_size=24", "temperature=0.2"]
    cfg = load_config(
        None,
        [
            f"method={method_name}",
            "widths=[4,4,8,8]",
            "head_hidden=16",
            "head_out=8",
            f"batch_size={N_GLOBAL}",
            *extra,
        ],
    )
    torch.manual_seed(0)
    method = build_method(cfg, INFO).double().eval()
    gen = torch.Generator().manual_seed(1)
    pairs = 2 if method_name in ("care", "care_moco") else 1  # + the group-shared pair
    stacks = [torch.randn(2 * N_GLOBAL, 1, 16, 16, generator=gen).double() for _ in range(pairs)]
    return method, stacks


def _local(stack: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of both views of a stacked pair."""
    n = N_GLOBAL // world
    view1, view2 = stack[:N_GLOBAL], stack[N_GLOBAL:]
    rows = slice(rank * n, (rank + 1) * n)
    return torch.cat([view1[rows], view2[rows]])


def _step(method: torch.nn.Module, stacks: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """One step on stacked pairs of views: InfoNCE's, then the group-shared one (if any)."""
    pairs = [ViewPair(stack[:n], stack[n:]) for stack in stacks]
    views = Views(pairs[0], pairs[1] if len(pairs) > 1 else None)
    losses = method.compute_losses(views)  # type: ignore[operator]
    losses["loss"].backward()
    result = {f"loss/{k}": v.detach() for k, v in losses.items()}
    for name, p in method.named_parameters():
        if p.grad is not None:
            result[f"grad/{name}"] = p.grad.detach().clone()
    if isinstance(method, MoCo):
        result["queue"] = method.queue.oldest_first().clone()
    return result


def _worker(rank: int, world: int, port: int, method_name: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method, stacks = _setup(method_name)
        result = _step(method, [_local(s, rank, world) for s in stacks], N_GLOBAL // world)
        for key, value in result.items():
            if key.startswith(("loss/", "grad/")):  # DDP averages gradients; losses are means
                dist.all_reduce(value)
                value /= world
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["simclr", "care", "moco", "care_moco"])
def test_two_ranks_give_the_loss_and_gradients_of_one(method_name: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks.pt"
    mp.start_processes(
        _worker,
        args=(2, _free_port(), method_name, str(out)),
        nprocs=2,
        start_method="spawn",
    )
    two = torch.load(out, weights_only=True)
    method, stacks = _setup(method_name)
    one = _step(method, stacks, N_GLOBAL)
    assert set(two) == set(one)
    grads = [k for k in one if k.startswith("grad/")]
    assert len(grads) > 10 and any(one[k].abs().max() > 0 for k in grads)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=TOLERANCE, rtol=1e-8), key


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = gather_with_grad(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
        (gathered * weights * (rank + 1)).sum().backward()
        assert x.grad is not None
        torch.save({"gathered": gathered.detach(), "grad": x.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_sums_every_ranks_gradient(tmp_path: Path) -> None:
    """d/dx_r Σ_s L_s, where rank s weights the gathered rows by (s + 1): the sum over ranks."""
    out = str(tmp_path / "gather")
    mp.start_processes(_gather_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.equal(result["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        expected = (1 + 2) * weights[2 * rank : 2 * rank + 2]
        assert torch.equal(result["grad"], expected)


def _pretrain_command(root: Path | None, out: Path, *extra: str) -> list[str]:
    """Two gloo processes; ``root=None`` reads the real Fashion-MNIST (`make data` installs it)."""
    args = tiny(root or Path("."), out, "accelerator=cpu", "devices=2", "strategy=ddp")
    if root is None:
        args = [a for a in args if not a.startswith("data_root=")] + ["train_samples=128"]
    return [sys.executable, "-m", "care", "pretrain", *args, "batch_size=16", *extra]


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_pretrains_fashion_mnist_on_two_cpu_processes_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = _run(_pretrain_command(None, out, "epochs=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["steps"] == 4  # 128 images / (2 ranks × 16)
    assert done.stdout.count("run written to") == 1  # rank 0 alone reports and writes
    resumed = _run(_pretrain_command(None, out, "epochs=2", "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_killed_two_process_run_resumes(fake_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    command = _pretrain_command(fake_fmnist, out, "epochs=6", "knn_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks, mid-run
    process.wait()
    assert checkpoint.is_file() and not (out / "summary.json").exists()
    resumed = _run([*command, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6 * 4


@pytest.mark.parametrize(
    ("method_name", "extra"),
    [("care", ("views=separate",)), ("care_moco", ("views=separate",)), ("simclr", ())],
)
def test_ddp_syncs_the_gradients_of_a_backward_per_pair_once(
    method_name: str, extra: tuple[str, ...], tmp_path: Path
) -> None:
    """A real Lightning DDP step (tests/train/ddp_step.py): with a backward per pair of views
    and the sync on the last one only, each rank holds the mean over ranks of its own
    single-backward gradients, as one backward under DDP would give."""
    out = tmp_path / "grads"
    command = [sys.executable, "-m", "tests.train.ddp_step", str(out), method_name, *extra]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:  # one all-reduce of each gradient bucket, not one per backward
        synced = rank["synced_buckets"].tolist()
        assert synced and len(synced) == len(set(synced)), synced
    names = [k.removeprefix("ddp/") for k in ranks[0] if k.startswith("ddp/")]
    assert len(names) > 10 and set(names) == {
        k.removeprefix("mean/") for k in ranks[0] if k.startswith("mean/")
    }
    for name in names:
        for rank in ranks:
            torch.testing.assert_close(
                rank[f"ddp/{name}"], rank[f"mean/{name}"], rtol=1e-4, atol=1e-6, msg=name
            )
        assert torch.equal(ranks[0][f"ddp/{name}"], ranks[1][f"ddp/{name}"]), name
    # The ranks' own gradients differ, so a missing or doubled sync would fail the test.
    differ = [
        n for n in names if not torch.allclose(ranks[0][f"local/{n}"], ranks[1][f"local/{n}"])
    ]
    assert len(differ) > len(names) // 2


def test_two_process_run_in_bf16_and_channels_last(fake_fmnist: Path, tmp_path: Path) -> None:
    """The GPU user's settings on 2 gloo processes: bf16 autocast, NHWC, care with separate views
    (a backward per pair under DDP)."""
    out = tmp_path / "bf16"
    extra = ("epochs=1", "precision=bf16-mixed", "memory_format=channels_last", "method=care")
    done = _run(_pretrain_command(fake_fmnist, out, *extra, "views=separate"))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["precision"], summary["memory_format"]) == ("bf16-mixed", "channels_last")
    assert summary["world_size"] == 2 and summary["steps"] == 128 // 32
    assert summary["final_knn_acc_percent"] is not None


def test_knn_monitor_on_two_processes_equals_one_and_resume_needs_one_checkpoint(
    tmp_path: Path,
) -> None:
    """tests/train/ddp_eval.py: each rank embeds its shard of the bank and test images (37 and
    23, so the shards are padded); the gathered accuracy is the single-process one on every
    rank. The resume check names a rank that cannot read rank 0's checkpoint or reads another
    file, and passes when both read one."""
    out = tmp_path / "eval"
    done = _run([sys.executable, "-m", "tests.train.ddp_eval", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["embedded"].tolist() == [19, 12]  # ceil(37 / 2), ceil(23 / 2): shards
        assert float(rank["knn"]) == float(ranks[0]["reference"])
    assert 0.0 < float(ranks[0]["reference"]) < 100.0  # a value the shards could get wrong (%)
    for rank in ranks:  # every rank refuses alike, so none is left waiting
        missing, other, shared = rank["refusals"]
        assert missing.startswith("rank 1 on host ") and "cannot read" in missing, missing
        assert "reads another" in other and "shares" in other, other
        assert shared == ""


def test_sigterm_to_rank_0_stops_both_ranks_after_a_step_and_they_resume(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    """Only the launcher's process (rank 0) gets SIGTERM: the ranks agree after the step (a
    CPU all-reduce), rank 0 writes the checkpoint, both exit, one line says where it stopped."""
    out = tmp_path / "stopped"
    command = _pretrain_command(fake_fmnist, out, "epochs=20", "knn_every=0")
    command.append("checkpoint_every_steps=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not checkpoint.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before the signal"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and stopped[0].endswith("resume with resume=true"), err[-3000:]
    step = int(stopped[0].split()[3])
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step
    resumed = _run([*command, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 20 * 4
