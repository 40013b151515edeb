"""Mid-epoch checkpoints: a run resumed from any of them ends with the uninterrupted weights."""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from care.config import load_config
from care.data import EpochSampler, ResumableLoader, TensorImages
from care.errors import CareError, RunInterrupted
from care.runs import AtomicCheckpointIO, safe_torch_load
from care.train import pretrain
from care.train.checkpoints import checkpoint_mismatch
from tests.conftest import tiny


def same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize(
    "extra",
    [
        ("method=care", "views=separate"),
        ("method=care_moco", "queue_size=64", "knn_every=0"),
        ("method=care", "views=shared", "precision=bf16-mixed", "memory_format=channels_last"),
    ],
)
def test_a_run_resumed_from_any_checkpoint_ends_with_the_same_weights(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    """Every checkpoint of a run with checkpoint_every_steps=1 (mid-epoch and epoch ends) is
    kept; a copy of the run resumed from each ends bit-identical to the uninterrupted run."""
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    save = AtomicCheckpointIO.save_checkpoint

    def keep_a_copy(
        self: AtomicCheckpointIO, checkpoint: dict[str, Any], path: Any, **options: Any
    ) -> None:
        save(self, checkpoint, path, **options)
        if Path(path).name == "last.ckpt":
            shutil.copy(path, snapshots / f"step{checkpoint['global_step']:03d}.ckpt")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", keep_a_copy)
    settings = ["epochs=2", "checkpoint_every_steps=1", *extra]
    straight = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "straight", *settings)))
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    steps = sorted(int(p.stem[4:]) for p in snapshots.iterdir())
    assert steps == list(range(1, 9))  # 4 steps per epoch, a checkpoint after each
    for step in (1, 3, 4, 6):  # mid-epoch 0, end of epoch 0, mid-epoch 1
        out = tmp_path / f"from{step}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(straight.config, out / "config.yaml")
        shutil.copy(snapshots / f"step{step:03d}.ckpt", out / "checkpoints" / "last.ckpt")
        resumed = pretrain(load_config(None, tiny(fake_fmnist, out, *settings, "resume=true")))
        same_weights(straight.backbone, resumed.backbone)
        same_weights(straight.head, resumed.head)
        final = safe_torch_load(resumed.last_checkpoint)
        assert final["global_step"] == 8


def test_a_signal_during_the_save_neither_corrupts_it_nor_changes_the_result(
    fake_fmnist: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM arrives while each checkpoint is being written: the first asks the run to stop
    after the next step, the second changes nothing; the checkpoint then resumes to the
    uninterrupted weights."""
    save = AtomicCheckpointIO.save_checkpoint

    def signalled_save(self: AtomicCheckpointIO, *args: Any, **options: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled during the save
        save(self, *args, **options)

    settings = ["epochs=2", "checkpoint_every_steps=2", "knn_every=0"]
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", signalled_save)
    with pytest.raises(RunInterrupted) as stopped:
        pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "run", *settings)))
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    assert (stopped.value.step, stopped.value.epoch) == (3, 1)  # epoch counts from 1
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "SIGTERM received: stopping after this step" in err
    assert "SIGTERM received: already stopping" in err
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers given back
    run = tmp_path / "run"
    assert safe_torch_load(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    resumed = pretrain(load_config(None, tiny(fake_fmnist, run, *settings, "resume=true")))
    straight = pretrain(load_config(None, tiny(fake_fmnist, tmp_path / "straight", *settings)))
    same_weights(straight.backbone, resumed.backbone)


def test_metrics_rows_reach_the_checkpoint(fake_fmnist: Path, tmp_path: Path) -> None:
    """metrics.csv is flushed with every checkpoint, so a kill after a mid-epoch checkpoint
    keeps the loss rows up to it."""
    run = pretrain(
        load_config(
            None, tiny(fake_fmnist, tmp_path / "r", "checkpoint_every_steps=2", "knn_every=0")
        )
    )
    with run.metrics.open(newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == [1, 2, 3, 4]


def test_the_loader_resumes_within_an_epoch_with_workers() -> None:
    """The loader's position is its state; a fresh loader given it continues the same order,
    whether the sampler's epoch is set before or after iter() (Lightning does the latter)."""
    images = TensorImages(
        torch.zeros(40, 1, 4, 4, dtype=torch.uint8),
        torch.arange(40),
        name="ids",
        num_classes=40,
        mean=(0.0,),
        std=(1.0,),
    )
    for workers in (0, 2):
        settings = {"batch_size": 8, "num_workers": workers, "persistent_workers": workers > 0}
        sampler = EpochSampler(40, seed=1)
        loader = ResumableLoader(images, sampler, **settings)
        sampler.set_epoch(1)
        full, state = [], {}
        for i, (_, labels) in enumerate(loader):
            full.append(labels.tolist())
            if i == 1:
                state = loader.state_dict()
        assert state == {"epoch": 1, "batches": 2}
        fresh_sampler = EpochSampler(40, seed=1)
        fresh = ResumableLoader(images, fresh_sampler, **settings)
        fresh.load_state_dict(state)
        batches = iter(fresh)  # before set_epoch, as in Lightning's setup_data
        fresh_sampler.set_epoch(1)
        assert [labels.tolist() for _, labels in batches] == full[2:]
        assert fresh.state_dict() == {"epoch": 1, "batches": 5}
        assert [labels.tolist() for _, labels in fresh] == full  # the next pass is whole again


def test_a_rank_that_does_not_see_rank_0s_checkpoint_is_named() -> None:
    out = Path("runs/x")
    assert checkpoint_mismatch([("abc", "n1"), ("abc", "n2")], out) is None
    assert checkpoint_mismatch([(None, "n1"), (None, "n2")], out) is None
    missing = checkpoint_mismatch([("abc", "n1"), ("abc", "n1"), (None, "n2")], out)
    assert missing is not None and missing.startswith("rank 2 on host n2 cannot read")
    assert "runs/x/checkpoints/last.ckpt" in missing and "shares" in missing
    other = checkpoint_mismatch([("abc", "n1"), ("def", "n2")], out)
    assert other is not None and "reads another" in other
    extra = checkpoint_mismatch([(None, "n1"), ("def", "n2")], out)
    assert extra is not None and "rank 0 does not" in extra


def test_checkpoint_every_steps_is_not_negative(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(CareError, match="checkpoint_every_steps"):
        load_config(None, tiny(fake_fmnist, tmp_path / "r", "checkpoint_every_steps=-1"))
