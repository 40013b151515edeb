from __future__ import annotations

import errno
import io
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import care.runs
from care.config import load_config
from care.errors import CareError
from care.runs import (
    AtomicCheckpointIO,
    RunDir,
    atomic_torch_save,
    atomic_write_text,
    load_weights,
    open_run,
    safe_torch_load,
    save_weights,
)
from tests.conftest import tiny


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


def _fail_with(code: int) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


class _FullDisk(io.FileIO):
    """A file that takes the first 10 bytes of a write, then reports a full disk."""

    def write(self, data: object) -> int:
        super().write(bytes(data)[:10])  # type: ignore[call-overload]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


#: How a write may fail: where, and what the error then says after the path.
WRITE_FAILURES = {
    "full-disk-on-write": (
        "fdopen",
        lambda fd, mode: _FullDisk(fd, mode),
        "No space left on device (errno 28): free space or choose another out=DIR",
    ),
    "full-disk-on-fsync": (
        "fsync",
        _fail_with(errno.ENOSPC),
        "No space left on device (errno 28): free space or choose another out=DIR",
    ),
    "quota": (
        "fsync",
        _fail_with(errno.EDQUOT),
        "Disk quota exceeded (errno 122): free space (the disk quota is used up) or choose "
        "another out=DIR",
    ),
    "permissions": (
        "mkstemp",
        _fail_with(errno.EACCES),
        "Permission denied (errno 13): fix the folder's permissions or choose another out=DIR",
    ),
    "read-only": (
        "replace",
        _fail_with(errno.EROFS),
        "Read-only file system (errno 30): the file system is read-only: choose another out=DIR",
    ),
    "file-size-limit": (
        "fsync",
        _fail_with(errno.EFBIG),
        "File too large (errno 27): the file size limit is too small for it: raise it (ulimit -f)",
    ),
}


@pytest.mark.parametrize("failure", WRITE_FAILURES)
def test_a_failed_write_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    where, fail, cause = WRITE_FAILURES[failure]
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(tempfile if where == "mkstemp" else os, where, fail)
    with pytest.raises(CareError) as caught:
        atomic_torch_save({"epoch": 2, "w": torch.ones(100)}, path)
    monkeypatch.undo()
    assert str(caught.value).startswith(f"cannot write {path}: {cause}"), caught.value
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before  # byte-identical, and no temp file left beside it
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert safe_torch_load(path) == {"epoch": 1}


WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda path: atomic_write_text(path, "new"),
    "weights": lambda path: save_weights(torch.nn.Linear(2, 2), path),
    "lightning checkpoint": lambda path: AtomicCheckpointIO().save_checkpoint({"a": 2}, path),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_reports_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"old")
    monkeypatch.setattr(care.runs.os, "fsync", _fail_with(errno.ENOSPC))
    with pytest.raises(CareError, match=r"^cannot write .*file: No space left on device"):
        WRITERS[writer](path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file"]


def _pretrain(
    root: Path, out: Path, *extra: str, file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`care pretrain` on tiny data in a subprocess, optionally under ``ulimit -f``."""

    def limit_file_size() -> None:  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        assert file_size_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "care", "pretrain", *tiny(root, out, "knn_every=0"), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=None if file_size_limit is None else limit_file_size,
    )


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = _pretrain(fake_fmnist, out)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = out / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    limit = len(before) // 2  # the checkpoint cannot be written; config, metrics and logs can
    late = (checkpoint, out / "encoder.pt2")  # encoder.pt2 comes after the last checkpoint
    others = [p for p in out.rglob("*") if p.is_file() and p not in late]
    assert max(p.stat().st_size for p in others) < limit, others

    resumed = _pretrain(fake_fmnist, out, "epochs=2", "resume=true", file_size_limit=limit)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, resumed.stderr[-2000:]
    assert errors[0].startswith("error: cannot write "), errors
    assert errors[0].split()[3] in (f"{checkpoint}:", f"{checkpoint.resolve()}:"), errors
    assert "File too large (errno 27)" in errors[0] and "ulimit -f" in errors[0]
    assert "Traceback" not in resumed.stderr
    assert checkpoint.read_bytes() == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.ckpt"]  # no temp file
    state = safe_torch_load(checkpoint)
    assert state["epoch"] == 0 and state["global_step"] == 4  # epoch 1's state (4 steps)
    assert not (out / ".care.lock").exists()
