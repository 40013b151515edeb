"""The registry, data-root search, argument checks, and the in-memory dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from care.data import (
    DATASETS,
    LabeledImages,
    TensorImages,
    load_dataset,
    registry,
    resolve_data_root,
)
from care.errors import CareError
from tests.data.writers import write_mnist


def test_registry_contents() -> None:
    assert set(DATASETS) == {
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "stl10",
        "imagefolder",
    }
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert len(spec.mean) == len(spec.std) == spec.channels
    assert DATASETS["cifar100"].num_classes == 100
    assert DATASETS["fashion-mnist"].mean == (0.2860,) and DATASETS["fashion-mnist"].std == (
        0.3530,
    )
    assert DATASETS["stl10"].std == (0.2603, 0.2566, 0.2713)


def test_unknown_dataset_and_split(tmp_path: Path) -> None:
    with pytest.raises(CareError, match="unknown dataset 'imagenet': use one of mnist, "):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(CareError, match="unknown split 'val' for mnist: use one of pretrain"):
        load_dataset("mnist", tmp_path, "val")


def test_name_is_forgiving(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    assert load_dataset("Fashion_MNIST", tmp_path, "test").name == "fashion-mnist"


def test_options_only_for_imagefolder(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    with pytest.raises(CareError, match="load_size=64 applies only to imagefolder"):
        load_dataset("mnist", tmp_path, "test", load_size=64)
    assert len(load_dataset("mnist", tmp_path, "test", load_size=28)) == 3
    with pytest.raises(CareError, match="class_list applies only to imagefolder"):
        load_dataset("mnist", tmp_path, "test", class_list="x.txt")
    with pytest.raises(CareError, match="load_size=0 is not a positive integer"):
        load_dataset("imagefolder", tmp_path, "test", load_size=0)


def test_root_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CareError, match=r"data_root .*nope for cifar10 is not a folder"):
        load_dataset("cifar10", tmp_path / "nope", "train")


def test_explicit_root_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_root("cifar10", "~/c10") == tmp_path / "c10"
    assert resolve_data_root("imagefolder", tmp_path) == tmp_path


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env, cwd, system = tmp_path / "env", tmp_path / "cwd", tmp_path / "system"
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (system,))
    monkeypatch.setenv("CARE_DATA", str(env))
    monkeypatch.chdir(tmp_path)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for base in (system, cwd / "data", env):
        (base / "cifar10").mkdir(parents=True)
        assert resolve_data_root("cifar10", None) == base / "cifar10"
    monkeypatch.delenv("CARE_DATA")
    assert resolve_data_root("cifar10", None) == cwd / "data" / "cifar10"


def test_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    monkeypatch.setenv("CARE_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CareError) as e:
        resolve_data_root("cifar10", None)
    message = str(e.value)
    assert message.startswith("dataset 'cifar10' not found: looked in ")
    for where in ("env/cifar10", "data/cifar10", "system/cifar10"):
        assert where in message
    assert message.endswith("download it there or pass data_root=PATH")
    with pytest.raises(CareError, match="make data"):
        resolve_data_root("fashion-mnist", None)


def test_load_from_searched_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist", n_test=4)
    monkeypatch.setenv("CARE_DATA", str(tmp_path))
    assert len(load_dataset("mnist", None, "test")) == 4


def _tensor_images(n: int = 5) -> TensorImages:
    images = torch.arange(n * 3 * 2 * 2, dtype=torch.uint8).reshape(n, 3, 2, 2)
    labels = torch.tensor([0, 1, -1, 2, 1][:n])
    return TensorImages(images, labels, name="toy", num_classes=3, mean=(0.5,) * 3, std=(0.2,) * 3)


def test_tensor_images() -> None:
    ds = _tensor_images()
    assert isinstance(ds, LabeledImages)
    assert len(ds) == 5 and ds.image_shape == (3, 2, 2) and ds.channels == 3
    image, label = ds[2]
    assert label == -1 and int(image[1, 0, 1]) == 2 * 12 + 4 + 1
    sub = ds.subset(3)
    assert isinstance(sub, TensorImages)
    assert len(sub) == 3 and sub.labels.tolist() == [0, 1, -1] and sub.mean == ds.mean
    assert "TensorImages(name='toy', n=5" in repr(ds)
    batch, labels = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 2, 2) and labels.tolist() == [0, 1, -1, 2, 1]


@pytest.mark.parametrize("n", [0, -1, 6, True, 2.0])
def test_bad_subset(n: int) -> None:
    with pytest.raises(CareError, match="cannot take the first"):
        _tensor_images().subset(n)


def _make(images: torch.Tensor, labels: torch.Tensor, channels: int = 1) -> TensorImages:
    return TensorImages(
        images, labels, name="t", num_classes=2, mean=(0.5,) * channels, std=(0.5,) * channels
    )


def test_tensor_images_validation() -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(CareError, match="uint8"):
        _make(images.float(), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(CareError, match="int64"):
        _make(images, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(CareError, match=r"outside -1\.\.1"):
        _make(images, torch.tensor([0, 2]))
    with pytest.raises(CareError, match="one value per channel"):
        _make(images, torch.tensor([0, 1]), channels=3)
