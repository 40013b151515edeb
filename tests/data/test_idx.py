"""MNIST / Fashion-MNIST: IDX files, raw and gzip, and every way they can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from care.data import TensorImages, load_dataset
from care.errors import CareError
from tests.data.writers import idx_bytes, rng_images, write_file, write_mnist

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_round_trip(tmp_path: Path, name: str, gz: bool) -> None:
    written = write_mnist(tmp_path, n_train=5, n_test=3, gz=gz)
    for split, part in (("pretrain", "train"), ("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, tmp_path, split)
        images, labels = written[part]
        assert isinstance(ds, TensorImages)
        assert len(ds) == len(labels)
        assert ds.image_shape == (1, 28, 28) and ds.channels == 1 and ds.num_classes == 10
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        image, label = ds[2]
        assert image.shape == (1, 28, 28)
        assert int(image[0, 7, 19]) == int(images[2, 7, 19])
        assert label == int(labels[2])
    assert ds.name == name
    assert ds.mean == ((0.1307,) if name == "mnist" else (0.2860,))
    assert ds.std == ((0.3081,) if name == "mnist" else (0.3530,))


def test_raw_file_is_preferred_to_gz(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=4, gz=True)
    raw = rng_images(7, (4, 28, 28))
    write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(raw))
    ds = load_dataset("mnist", tmp_path, "train")
    assert isinstance(ds, TensorImages)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw))


def test_subset(tmp_path: Path) -> None:
    written = write_mnist(tmp_path, n_train=6)
    sub = load_dataset("mnist", tmp_path, "train").subset(4)
    assert len(sub) == 4
    assert [sub[i][1] for i in range(4)] == [int(v) for v in written["train"][1][:4]]


def _error(root: Path) -> str:
    with pytest.raises(CareError) as info:
        load_dataset("mnist", root, "train")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    message = _error(tmp_path)
    assert "train-labels-idx1-ubyte[.gz]" in message
    assert str(tmp_path) in message and "data_root=" in message


def test_missing_fashion_mnist_mentions_make_data(tmp_path: Path) -> None:
    with pytest.raises(CareError, match="make data"):
        load_dataset("fashion-mnist", tmp_path, "test")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"\x08\x03\x00\x00", "not an IDX file"),
        (b"\x00\x00\x0d\x03", "element type 0x0d"),
        (b"\x00\x00\x08\x02", "2 dimensions, expected 3"),
    ],
)
def test_bad_header(tmp_path: Path, header: bytes, match: str) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(header + path.read_bytes()[4:])
    with pytest.raises(CareError, match=match):
        load_dataset("mnist", tmp_path, "train")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    data = idx_bytes(rng_images(0, (5, 28, 28)))[:-100]
    write_file(tmp_path / "train-images-idx3-ubyte", data, gz=gz)
    message = _error(tmp_path)
    assert "5 x 28 x 28 = 3920 bytes but the file holds 3820" in message


def test_truncated_header(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    assert "header is truncated" in _error(tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=5)
    write_file(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)))
    assert "holds 5 images but" in _error(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=5)
    write_file(
        tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 10, 2, 3], np.uint8))
    )
    assert "label 10 is outside 0..9" in _error(tmp_path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    message = _error(tmp_path)
    assert message.startswith("corrupt file") and "re-download" in message


def test_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    assert "corrupt file" in _error(tmp_path)


def test_gzip_with_bad_deflate_data(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:40] = b"\xff" * 20
    path.write_bytes(bytes(data))
    assert "corrupt file" in _error(tmp_path)


def test_real_fashion_mnist_test_split() -> None:
    if not SYSTEM_FASHION.is_dir():
        pytest.skip(f"{SYSTEM_FASHION} is absent (Debian package dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", SYSTEM_FASHION, "test")
    assert isinstance(ds, TensorImages)
    assert len(ds) == 10000 and ds.image_shape == (1, 28, 28)
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 1000))
