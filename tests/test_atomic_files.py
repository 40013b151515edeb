"""Files written as one result (embeddings and labels, weights of backbone and head, a JSON and
its plots) are replaced together: a failure leaves the old set or none of it, never a mix."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

import care.runs as runs
from care.errors import CareError
from care.runs import atomic_write_files


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, name: str, call: int) -> None:
    """``os.<name>`` raises ENOSPC on its ``call``-th call (1-based)."""
    original: Any = getattr(os, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(runs.os, name, failing)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "x.npy", tmp_path / "x.labels.npy"
    first.write_bytes(b"old embeddings")
    second.write_bytes(b"old labels")
    return first, second


def test_both_files_are_written(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "x.npy", tmp_path / "a" / "x.labels.npy"
    atomic_write_files({first: b"new embeddings", second: b"new labels"})
    assert (first.read_bytes(), second.read_bytes()) == (b"new embeddings", b"new labels")
    assert sorted(p.name for p in first.parent.iterdir()) == ["x.labels.npy", "x.npy"]


def test_a_full_disk_while_writing_the_second_keeps_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _pair(tmp_path)
    _fail_on_call(monkeypatch, "fsync", 2)
    with pytest.raises(CareError, match=r"cannot write .*x\.labels\.npy: No space left"):
        atomic_write_files({first: b"new embeddings", second: b"new labels"})
    assert (first.read_bytes(), second.read_bytes()) == (b"old embeddings", b"old labels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.labels.npy", "x.npy"]  # no temps


def test_a_failure_between_the_renames_leaves_neither_old_nor_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _pair(tmp_path)
    _fail_on_call(monkeypatch, "replace", 2)
    with pytest.raises(CareError, match="cannot write"):
        atomic_write_files({first: b"new embeddings", second: b"new labels"})
    assert list(tmp_path.iterdir()) == []  # 60,000 new embeddings beside 32 old labels: never
