from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from care.config import load_config
from care.errors import CareError
from care.runs import (
    RunDir,
    atomic_torch_save,
    atomic_write_text,
    load_weights,
    open_run,
    safe_torch_load,
    save_weights,
)


class PickleExploit:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": PickleExploit(marker)}, path, pickle_protocol=2)
    with pytest.raises(CareError, match="refusing to load"):
        safe_torch_load(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(PickleExploit(marker)))
    with pytest.raises(CareError):
        safe_torch_load(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CareError, match="corrupt"):
        safe_torch_load(path)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "x.txt", "hello")
    atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "x.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt", "x.txt"]
    assert safe_torch_load(tmp_path / "x.ckpt")["a"].shape == (2,)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"a": 1}, path)

    class Unsaveable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unsaveable()}, path)
    assert safe_torch_load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_safetensors_round_trip_and_mismatch(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    save_weights(module, tmp_path / "w.safetensors")
    other = torch.nn.Linear(3, 2)
    load_weights(other, tmp_path / "w.safetensors")
    assert torch.equal(other.weight, module.weight)
    with pytest.raises(CareError, match="does not match"):
        load_weights(torch.nn.Linear(4, 2), tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CareError, match="corrupt"):
        load_weights(other, tmp_path / "bad.safetensors")


def _saved_run(root: Path, *overrides: str) -> None:
    run = RunDir(root)
    run.write_config(load_config(None, [f"out={root}", *overrides]))
    atomic_write_text(run.last_checkpoint, "checkpoint")


def test_open_run_resumes_only_the_same_training(tmp_path: Path) -> None:
    fresh, checkpoint = open_run(load_config(None, [f"out={tmp_path / 'new'}"]))
    assert checkpoint is None and fresh.root == tmp_path / "new"
    _saved_run(tmp_path / "old", "lr=0.01", "epochs=2")
    with pytest.raises(CareError, match="resume=true"):
        open_run(load_config(None, [f"out={tmp_path / 'old'}", "lr=0.01", "epochs=2"]))
    with pytest.raises(CareError, match="different 'lr'"):
        open_run(load_config(None, [f"out={tmp_path / 'old'}", "lr=0.1", "resume=true"]))
    # more epochs, and settings that do not change what is learned, continue the run
    same = [f"out={tmp_path / 'old'}", "lr=0.01", "resume=true", "epochs=5", "num_workers=2"]
    run, checkpoint = open_run(load_config(None, [*same, "probe_epochs=3", "knn_every=0"]))
    assert checkpoint == run.last_checkpoint


def test_a_moved_run_folder_resumes(tmp_path: Path) -> None:
    _saved_run(tmp_path / "before", "lr=0.01")
    (tmp_path / "before").rename(tmp_path / "after")
    cfg = load_config(None, [f"out={tmp_path / 'after'}", "lr=0.01", "resume=true"])
    run, checkpoint = open_run(cfg)
    assert run.root == tmp_path / "after"
    assert checkpoint == tmp_path / "after" / "checkpoints" / "last.ckpt"
