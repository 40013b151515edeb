"""`care embed`: embeddings equal to ``care.load_encoder``'s, its three formats, neighbours,
1- and 3-channel runs, image folders, and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from care.cli import main
from care.data import load_dataset, load_split
from care.evaluate.embed import (
    label_text,
    labels_path,
    nearest_neighbours,
    neighbours_path,
    pick_queries,
)
from care.runs import RunDir, load_encoder
from tests.conftest import fails_with_one_line, tiny
from tests.data.test_cifar import write_cifar10
from tests.data.writers import rng_images, write_png


@pytest.fixture(scope="module")
def gray_run(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "gray"
    assert main(["pretrain", *tiny(fake_fmnist, out, "knn_every=0")]) == 0
    return out


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, per_batch=13)  # 65 training and 13 test images
    return root


@pytest.fixture(scope="module")
def rgb_run(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "rgb"
    args = tiny(cifar_root, out, "dataset=cifar10", "knn_every=0", "embedding=hyperboloid")
    assert main(["pretrain", *args]) == 0
    return out


def _split(run: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_split(RunDir(run).read_config(), split)
    images = torch.stack([data[i][0] for i in range(len(data))])
    return images, torch.tensor([data[i][1] for i in range(len(data))])


def _expected(run: Path, images: torch.Tensor, layer: str = "backbone") -> torch.Tensor:
    with torch.no_grad():
        return load_encoder(run, layer)(images)


def test_embeddings_equal_load_encoders_and_the_formats_agree(
    gray_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = _split(gray_run, "test")
    expected = _expected(gray_run, images)
    out = tmp_path / "test.safetensors"
    assert main(["embed", str(gray_run), f"out={out}"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("wrote 64 backbone embeddings (64 × 8, fashion-mnist test, ")
    assert f"and labels to {out}; next: load them with safetensors.torch.load_file(" in line
    written = load_file(str(out))
    torch.testing.assert_close(written["embeddings"], expected)
    assert torch.equal(written["labels"], labels)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["run"] == str(gray_run.absolute())
    assert (metadata["layer"], metadata["dataset"], metadata["split"]) == (
        "backbone",
        "fashion-mnist",
        "test",
    )
    assert json.loads(metadata["classes"])[9] == "Ankle boot"

    assert main(["embed", str(gray_run), f"out={tmp_path / 'test.npy'}", "batch_size=7"]) == 0
    assert "test.labels.npy" in capsys.readouterr().out
    assert labels_path(tmp_path / "test.npy") == tmp_path / "test.labels.npy"
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "test.npy")), expected)
    assert np.array_equal(np.load(tmp_path / "test.labels.npy"), labels.numpy())

    assert main(["embed", str(gray_run), f"out={tmp_path / 'test.npz'}"]) == 0
    with np.load(tmp_path / "test.npz") as npz:
        assert np.array_equal(npz["embeddings"], written["embeddings"].numpy())
        assert np.array_equal(npz["labels"], labels.numpy())


def test_rgb_run_projection_layer_of_the_training_split(rgb_run: Path, tmp_path: Path) -> None:
    images, labels = _split(rgb_run, "train")
    expected = _expected(rgb_run, images, "projection")
    out = tmp_path / "train.safetensors"
    args = ["embed", str(rgb_run), "split=train", "layer=projection", f"out={out}"]
    assert main([*args, "neighbours=3"]) == 0
    written = load_file(str(out))
    assert written["embeddings"].shape == (65, 9)  # the hyperboloid: head_out + 1
    torch.testing.assert_close(written["embeddings"], expected)
    assert torch.equal(written["labels"], labels)
    png = neighbours_path(out)
    assert png == tmp_path / "train.neighbours.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] / 3


def test_an_image_folder_with_an_rgb_run(rgb_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for c, name in enumerate(("cats", "dogs", "owls")):
            for i in range(3):
                write_png(root / split / name / f"{i}.png", rng_images(10 * c + i, (12, 12, 3)))
    out = tmp_path / "folder.safetensors"
    args = ["embed", str(rgb_run), "dataset=imagefolder", f"data_root={root}", f"out={out}"]
    assert main([*args, "neighbours=2"]) == 0
    data = load_dataset("imagefolder", root, "test")  # val/, decoded at 256 px
    images = torch.stack([data[i][0] for i in range(len(data))])
    written = load_file(str(out))
    torch.testing.assert_close(written["embeddings"], _expected(rgb_run, images))
    assert written["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["classes"]) == ["cats", "dogs", "owls"]
    assert neighbours_path(out).is_file()


def test_nearest_neighbours_of_a_crafted_case() -> None:
    # two tight clusters on the unit circle, and a point at π (nearer the second cluster)
    angles = torch.tensor([0.0, 0.1, -0.2, 0.3, 2.0, 2.05, 1.9, 3.14159])
    embeddings = (
        torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.arange(1, 9)[:, None]
    )  # lengths differ: cosine similarity ignores them
    found, similarity = nearest_neighbours(embeddings, [0, 4], k=3)
    assert found.tolist() == [[1, 2, 3], [5, 6, 7]]
    torch.testing.assert_close(similarity[0], torch.cos(torch.tensor([0.1, 0.2, 0.3])))
    assert torch.all(similarity[:, :-1] >= similarity[:, 1:])
    (opposite,), _ = nearest_neighbours(embeddings, [7], k=1)
    assert opposite.tolist() == [5]  # the nearest of the others (2.05 rad), never itself


def test_queries_are_first_of_distinct_classes_then_the_next_images() -> None:
    labels = torch.tensor([3, 3, 1, 3, 1, 0, 2, 2])
    assert pick_queries(labels, 3) == [0, 2, 5]
    assert pick_queries(labels, 6) == [0, 2, 5, 6, 1, 3]
    assert pick_queries(torch.full((5,), -1), 8) == [0, 1, 2, 3, 4]
    assert label_text(-1, None) == "unlabeled" and label_text(2, ("a", "b", "c")) == "c"
    assert label_text(4, None) == "4"


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (["layer=head", "out=e.npy"], "unknown layer 'head'"),
        (["out=e.csv"], "out=e.csv has an unknown extension: end it in .safetensors"),
        ([], "no output file: add out=FILE.safetensors"),
        (["split=val", "out=e.npy"], "unknown split 'val'"),
        (["neighbours=99", "out=e.npy"], "bad value for 'neighbours': 99"),
        (["batch_size=x", "out=e.npy"], "bad value for 'batch_size'"),
        (["colour=red", "out=e.npy"], "unknown setting 'colour'"),
        (["dataset=cifar100", "out=e.npy"], "dataset 'cifar100' not found"),
    ],
)
def test_bad_inputs_are_one_line(
    gray_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    settings: list[str],
    fragment: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARE_DATA", raising=False)
    fails_with_one_line(capsys, ["embed", str(gray_run), *settings], fragment)
    assert not list(tmp_path.iterdir())  # nothing written


def test_another_channel_count_and_too_few_images_are_one_line(
    gray_run: Path, rgb_run: Path, cifar_root: Path, fake_fmnist: Path, tmp_path: Path, capsys
) -> None:
    out = f"out={tmp_path / 'e.npy'}"
    fails_with_one_line(
        capsys,
        ["embed", str(gray_run), "dataset=cifar10", f"data_root={cifar_root}", out],
        "dataset 'cifar10' has 3-channel images but",
    )
    fails_with_one_line(
        capsys,
        ["embed", str(rgb_run), "dataset=fashion-mnist", f"data_root={fake_fmnist}", out],
        "embed a dataset with 3 channels",
    )
    fails_with_one_line(capsys, ["embed", str(tmp_path / "nowhere"), out], "run directory")
    fails_with_one_line(
        capsys, ["embed", str(rgb_run), "neighbours=13", out], "needs more than 13 images"
    )
    assert not list(tmp_path.iterdir())
