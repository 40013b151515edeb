"""CIFAR-10/100: official-style pickles, the restricted unpickler, and malformed batches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from care.data import TensorImages, load_dataset
from care.errors import CareError
from tests.data.writers import U8, cifar_batch, py2_pickle, rng_images

C10 = "cifar-10-batches-py"
C100 = "cifar-100-python"


def write_cifar10(root: Path, per_batch: int = 2) -> dict[str, tuple[U8, list[int]]]:
    """Five training batches and a test batch, Python 2 style; returns what was written."""
    folder = root / C10
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for seed, name in enumerate(names):
        images = rng_images(seed, (per_batch, 3, 32, 32))
        labels = [(seed + i) % 10 for i in range(per_batch)]
        (folder / name).write_bytes(py2_pickle(cifar_batch(images, labels)))
        written[name] = (images, labels)
    return written


def test_cifar10_round_trip(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train")
    assert isinstance(train, TensorImages)
    assert len(train) == 10 and train.image_shape == (3, 32, 32) and train.num_classes == 10
    batches = [written[f"data_batch_{i}"] for i in range(1, 6)]
    expected = np.concatenate([b[0] for b in batches])
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == [label for b in batches for label in b[1]]
    # data rows are R, G, B planes of 32x32, row-major: pixel (c, y, x) = row[c*1024 + y*32 + x]
    row = written["data_batch_3"][0][1].reshape(3072)
    image, label = train[5]
    assert int(image[2, 17, 5]) == int(row[2 * 1024 + 17 * 32 + 5])
    assert label == written["data_batch_3"][1][1]
    pretrain = load_dataset("cifar10", tmp_path, "pretrain")
    assert isinstance(pretrain, TensorImages) and torch.equal(pretrain.images, train.images)
    test = load_dataset("cifar10", tmp_path / C10, "test")  # root may be the batches folder
    assert isinstance(test, TensorImages)
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0]))
    assert test.mean == (0.4914, 0.4822, 0.4465) and test.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / C100
    folder.mkdir()
    for name, seed in (("train", 0), ("test", 1)):
        images = rng_images(seed, (3, 3, 32, 32))
        batch = cifar_batch(images, [0, 57, 99], label_key=b"fine_labels")
        batch[b"coarse_labels"] = [0, 1, 19]
        (folder / name).write_bytes(py2_pickle(batch))
    ds = load_dataset("cifar100", tmp_path, "test")
    assert isinstance(ds, TensorImages)
    assert ds.num_classes == 100 and ds.labels.tolist() == [0, 57, 99]
    assert torch.equal(ds.images, torch.from_numpy(rng_images(1, (3, 3, 32, 32))))
    assert len(load_dataset("cifar100", folder, "pretrain")) == 3


@pytest.mark.parametrize("keys", ["bytes", "str"])
def test_python3_protocol2_pickles(tmp_path: Path, keys: str) -> None:
    folder = tmp_path / C10
    folder.mkdir()
    images = rng_images(3, (2, 3, 32, 32))
    batch: dict[bytes | str, object] = {b"data": images.reshape(2, 3072), b"labels": [3, 4]}
    batch[b"batch_label"] = b""  # Python 3 pickles b"" as builtins.bytes()
    if keys == "str":
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    ds = load_dataset("cifar10", tmp_path, "test")
    assert isinstance(ds, TensorImages)
    assert torch.equal(ds.images, torch.from_numpy(images)) and ds.labels.tolist() == [3, 4]


class _Malicious:
    """Unpickling this runs ``call(*args)``."""

    def __init__(self, call: object, args: tuple[object, ...]) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.call, self.args


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, how: str) -> None:
    folder = tmp_path / C10
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = (
        _Malicious(os.system, (f"touch {marker}",))
        if how == "os.system"
        else _Malicious(open, (str(marker), "w"))
    )
    batch = {b"data": payload, b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(CareError, match=r"refusing to unpickle .*test_batch: it references") as e:
        load_dataset("cifar10", tmp_path, "test")
    assert ("system" if how == "os.system" else "open") in str(e.value)
    assert "not a CIFAR batch" in str(e.value)
    assert not marker.exists()


def _write_test_batch(root: Path, batch: object, *, python2: bool = True) -> None:
    folder = root / C10
    folder.mkdir(exist_ok=True)
    data = py2_pickle(batch) if python2 else pickle.dumps(batch, protocol=2)
    (folder / "test_batch").write_bytes(data)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"expected \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "float32"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"outside 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, r"outside 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "not integers"),
        ({b"labels": [0, 1]}, "no 'data' entry"),
        ([1, 2, 3], "holds a list, not a CIFAR batch"),
    ],
)
def test_malformed_batch(tmp_path: Path, batch: object, match: str) -> None:
    _write_test_batch(tmp_path, batch, python2=False)
    with pytest.raises(CareError, match=match):
        load_dataset("cifar10", tmp_path, "test")


def test_truncated_pickle(tmp_path: Path) -> None:
    batch = cifar_batch(rng_images(0, (2, 3, 32, 32)), [0, 1])
    _write_test_batch(tmp_path, batch)
    path = tmp_path / C10 / "test_batch"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CareError, match=r"^corrupt file .*test_batch .*re-download it$"):
        load_dataset("cifar10", tmp_path, "test")


def test_missing_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / C10 / "data_batch_4").unlink()
    with pytest.raises(CareError, match=r"missing file data_batch_4 in .*data_root=PATH"):
        load_dataset("cifar10", tmp_path, "pretrain")


def test_archive_not_extracted(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(CareError, match="tar xzf"):
        load_dataset("cifar100", tmp_path, "train")
