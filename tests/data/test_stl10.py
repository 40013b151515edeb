"""STL-10: column-major binaries, the unlabeled split, and malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from care.data import TensorImages, load_dataset
from care.errors import CareError
from tests.data.writers import U8, rng_images, stl10_bytes

FOLDER = "stl10_binary"


def write_stl10(
    root: Path, n_train: int = 3, n_test: int = 2, n_unlabeled: int | None = 2
) -> dict[str, U8]:
    """STL-10 binaries under ``root/stl10_binary``; returns the CHW images written, by part."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    written = {}
    for part, n, seed in (
        ("train", n_train, 0),
        ("test", n_test, 1),
        ("unlabeled", n_unlabeled, 2),
    ):
        if n is None:
            continue
        images = rng_images(seed, (n, 3, 96, 96))
        (folder / f"{part}_X.bin").write_bytes(stl10_bytes(images))
        if part != "unlabeled":
            labels = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10 on disk
            (folder / f"{part}_y.bin").write_bytes(labels.tobytes())
        written[part] = images
    return written


def test_round_trip(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    train = load_dataset("stl10", tmp_path, "train")
    assert isinstance(train, TensorImages)
    assert len(train) == 3 and train.image_shape == (3, 96, 96) and train.num_classes == 10
    assert torch.equal(train.images, torch.from_numpy(written["train"]))
    assert train.images.is_contiguous()
    assert train.labels.tolist() == [0, 1, 2]
    # on disk, pixel (c, y, x) of image i sits at byte i*27648 + c*9216 + x*96 + y
    raw = (tmp_path / FOLDER / "train_X.bin").read_bytes()
    image, label = train[1]
    assert int(image[2, 10, 70]) == raw[27648 + 2 * 9216 + 70 * 96 + 10]
    assert int(image[2, 10, 70]) == int(written["train"][1, 2, 10, 70])
    assert label == 1
    test = load_dataset("stl10", tmp_path / FOLDER, "test")  # root may be stl10_binary itself
    assert isinstance(test, TensorImages)
    assert torch.equal(test.images, torch.from_numpy(written["test"]))
    assert test.mean == (0.4467, 0.4398, 0.4066)


def test_pretrain_is_train_plus_unlabeled(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    ds = load_dataset("stl10", tmp_path, "pretrain")
    assert isinstance(ds, TensorImages)
    assert len(ds) == 5
    expected = np.concatenate([written["train"], written["unlabeled"]])
    assert torch.equal(ds.images, torch.from_numpy(expected))
    assert ds.labels.tolist() == [0, 1, 2, -1, -1]
    assert ds[4][1] == -1
    sub = ds.subset(3)
    assert isinstance(sub, TensorImages) and sub.labels.tolist() == [0, 1, 2]


def test_pretrain_without_unlabeled(tmp_path: Path) -> None:
    write_stl10(tmp_path, n_unlabeled=None)
    with pytest.raises(CareError, match=r"unlabeled_X.bin .* is missing"):
        load_dataset("stl10", tmp_path, "pretrain")
    assert len(load_dataset("stl10", tmp_path, "train")) == 3


def test_size_not_a_multiple(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    path = tmp_path / FOLDER / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CareError, match="not a multiple of 27648"):
        load_dataset("stl10", tmp_path, "test")


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    (tmp_path / FOLDER / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(CareError, match=r"holds 2 labels but .*train_X.bin holds 3 images"):
        load_dataset("stl10", tmp_path, "train")


@pytest.mark.parametrize("bad", [0, 11])
def test_label_out_of_range(tmp_path: Path, bad: int) -> None:
    write_stl10(tmp_path)
    (tmp_path / FOLDER / "train_y.bin").write_bytes(bytes([1, bad, 3]))
    with pytest.raises(CareError, match=r"outside 1\.\.10"):
        load_dataset("stl10", tmp_path, "train")


def test_missing_file(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    (tmp_path / FOLDER / "test_y.bin").unlink()
    with pytest.raises(CareError, match=r"missing file test_y.bin in .*stl10_binary.*data_root="):
        load_dataset("stl10", tmp_path, "test")
