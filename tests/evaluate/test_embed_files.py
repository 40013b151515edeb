"""`care embed` writes its files as one result, and shows class folders whose names are not
UTF-8 in its nearest-neighbour grid."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import care.runs as runs
from care.cli import main
from care.evaluate.embed import label_text, printable
from tests.conftest import tiny
from tests.data.writers import write_png


def test_a_full_disk_keeps_the_old_embeddings_and_labels_together(
    fake_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", *tiny(fake_fmnist, run, "knn_every=0")]) == 0
    out = tmp_path / "e.npy"
    assert main(["embed", str(run), f"out={out}", "split=train"]) == 0  # 128 images
    old = (out.read_bytes(), (tmp_path / "e.labels.npy").read_bytes())
    original: Any = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the labels file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fd)

    monkeypatch.setattr(runs.os, "fsync", fsync)
    capsys.readouterr()
    assert main(["embed", str(run), f"out={out}", "split=test"]) == 2  # 64 images
    assert "No space left on device" in capsys.readouterr().err
    assert (out.read_bytes(), (tmp_path / "e.labels.npy").read_bytes()) == old
    assert np.load(out).shape[0] == np.load(tmp_path / "e.labels.npy").shape[0] == 128


def test_class_folders_named_in_latin_1_appear_in_the_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    names = [b"caf\xe9", b"na\xefve", b"plain"]  # Latin-1 bytes: not UTF-8
    for split, count in (("train", 24), ("val", 6)):
        for name in names:
            folder = os.path.join(os.fsencode(root / split), name)
            os.makedirs(folder)
            for i in range(count):
                pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                write_png(Path(os.fsdecode(folder)) / f"{i}.png", pixels)
    run = tmp_path / "run"
    settings = tiny(root, run, "dataset=imagefolder", "image_size=8", "load_size=8")
    settings += ["batch_size=24", "knn_every=0"]
    assert main(["pretrain", *settings]) == 0
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(run), f"out={out}", "neighbours=3"]) == 0, capsys.readouterr().err
    assert (tmp_path / "e.neighbours.png").read_bytes()[:4] == b"\x89PNG"
    assert label_text(0, (os.fsdecode(b"caf\xe9"),)) == "caf\ufffd"
    assert printable("plain") == "plain"
