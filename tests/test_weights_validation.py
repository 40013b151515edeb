"""A run's weights files are checked before they are trusted: their metadata, then every
tensor's name, dtype and shape (from the header, before anything is allocated), then the values;
``care probe`` and ``care equivariance`` build the same model as ``care embed``, and refuse a
config.yaml that disagrees with the weights. Every refusal is one line naming the file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import care.runs
from care.cli import main
from care.data import data_info, load_split
from care.errors import CareError
from care.models import Encoder, ResNet, TrainedEncoder
from care.runs import RunDir, load_encoder, load_trained_encoder, read_weights
from tests.conftest import tiny

FIX = "rerun the training, or restore the file"


@pytest.fixture(scope="module")
def run_dir(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out, "knn_every=0")]) == 0
    return out


def _copy(run_dir: Path, tmp_path: Path) -> RunDir:
    return RunDir(shutil.copytree(run_dir, tmp_path / "run"))


def _set_metadata(path: Path, **values: str) -> None:
    tensors, metadata = read_weights(path)
    save_file(tensors, str(path), metadata={**metadata, **values})


def _change_tensors(path: Path, change: Any) -> None:
    """Rewrite ``path`` with ``change(tensors)`` applied, keeping its metadata."""
    tensors, metadata = read_weights(path)
    change(tensors)
    save_file(tensors, str(path), metadata=metadata or None)


def _relabel(path: Path, name: str, dtype: str) -> None:
    """Give tensor ``name`` another dtype of the same size in the file's header (its bytes stay)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    path.write_bytes(data[:8] + text.ljust(size) + data[8 + size :])


def _refused(run: RunDir, layer: str = "backbone") -> str:
    with pytest.raises(CareError) as caught:
        load_encoder(run.root, layer)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def _embed_fails(capsys: pytest.CaptureFixture[str], run: RunDir, tmp_path: Path) -> str:
    """``care embed`` of ``run`` exits with 2 and one line; that line."""
    assert main(["embed", str(run.root), f"out={tmp_path / 'e.safetensors'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


BAD_METADATA = {
    "widths=[Infinity,...]": {"widths": "[Infinity, 4, 8, 8]"},
    "widths=10^6": {"widths": "[1000000, 1000000, 1000000, 1000000]"},
    "empty mean": {"mean": "[]"},
    "negative head": {"head_out": "-8"},
    "negative image size": {"image_size": "-1"},
    "std 0": {"std": "[0.0]"},
    "curvature inf": {"curvature": "Infinity"},
    "crop 2": {"eval_crop_fraction": "2.0"},
}


@pytest.mark.parametrize("values", BAD_METADATA.values(), ids=list(BAD_METADATA))
def test_bad_metadata_is_one_line_naming_the_weights_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], values: dict[str, str]
) -> None:
    run = _copy(run_dir, tmp_path)
    _set_metadata(run.backbone, **values)
    err = _embed_fails(capsys, run, tmp_path)
    (key,) = values
    assert f"weights file {run.backbone} has invalid care metadata" in err, err
    assert f"'{key}'" in err and FIX in err and "config.yaml" not in err, err


def test_metadata_that_does_not_fit_the_weights_is_refused_before_allocating(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _copy(run_dir, tmp_path)
    _set_metadata(run.backbone, widths="[4, 4, 8, 2000]")
    devices: list[str] = []

    class Recorded(TrainedEncoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            devices.append(torch.empty(0).device.type)  # where factories put tensors now
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(care.runs, "TrainedEncoder", Recorded)
    message = _refused(run)
    assert devices == ["meta"]  # the model was only ever built without memory
    assert message.startswith(f"weights file {run.backbone} does not match"), message
    assert "layers.6.conv1.weight" in message and "[2000, 8, 3, 3]" in message, message
    assert "config.yaml" not in message and FIX in message


def _as(dtype: torch.dtype, name: str) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].to(dtype)

    return change


WRONG_DTYPES = {
    "int8 weight": (_as(torch.int8, "stem.0.weight"), "'stem.0.weight' is stored as I8"),
    "bool weight": (_as(torch.bool, "stem.1.bias"), "'stem.1.bias' is stored as BOOL"),
    "float count": (
        _as(torch.float32, "stem.1.num_batches_tracked"),
        "'stem.1.num_batches_tracked' is stored as F32, where the model needs an integer",
    ),
}


@pytest.mark.parametrize("case", WRONG_DTYPES.values(), ids=list(WRONG_DTYPES))
def test_weights_of_the_wrong_dtype_are_refused(
    run_dir: Path, tmp_path: Path, case: tuple[Any, str]
) -> None:
    change, fragment = case
    run = _copy(run_dir, tmp_path)
    _change_tensors(run.backbone, change)
    message = _refused(run)
    assert message.startswith(f"weights file {run.backbone} does not match"), message
    assert fragment in message and FIX in message, message


def test_relabelled_tensors_are_refused(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    _relabel(run.backbone, "stem.0.weight", "I32")  # float32 bytes read as int32: 1e9 weights
    message = _refused(run)
    assert "'stem.0.weight' is stored as I32, where the model needs a floating-point" in message


def _drop(name: str) -> Any:
    return lambda tensors: tensors.pop(name)


def _add(tensors: dict[str, torch.Tensor]) -> None:
    tensors["extra.weight"] = torch.zeros(3)


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    tensors["stem.1.weight"] = torch.ones(5)


WRONG_NAMES = {
    "missing": (_drop("layers.7.bn2.running_var"), "lacks tensor 'layers.7.bn2.running_var'"),
    "unexpected": (_add, "holds tensor 'extra.weight'"),
    "wrong shape": (_reshape, "'stem.1.weight' has shape [5], where the model needs [4]"),
}


@pytest.mark.parametrize("case", WRONG_NAMES.values(), ids=list(WRONG_NAMES))
def test_missing_unexpected_and_misshapen_tensors_are_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple[Any, str]
) -> None:
    change, fragment = case
    run = _copy(run_dir, tmp_path)
    _change_tensors(run.backbone, change)
    err = _embed_fails(capsys, run, tmp_path)
    assert f"weights file {run.backbone} does not match" in err and fragment in err, err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["backbone", "head"])
def test_non_finite_weights_are_refused(
    run_dir: Path, tmp_path: Path, name: str, value: float
) -> None:
    run = _copy(run_dir, tmp_path)
    path, key = (
        (run.backbone, "layers.0.conv1.weight") if name == "backbone" else (run.head, "net.3.bias")
    )

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = value

    _change_tensors(path, poison)
    message = _refused(run, "projection")
    assert message.startswith(f"weights file {path} holds non-finite values"), message
    assert f"'{key}'" in message and FIX in message


def test_a_head_that_does_not_fit_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    _change_tensors(run.head, _drop("net.0.weight"))
    assert load_encoder(run.root, "backbone").dim == 8  # the backbone alone needs no head
    message = _refused(run, "projection")
    assert message.startswith(f"weights file {run.head} does not match"), message
    assert "'net.0.weight'" in message


# ------------------------------------------------------- probe and equivariance: one model


def _channels(run: RunDir) -> int:
    cfg = run.read_config()
    return data_info(cfg, load_split(cfg, "test")).channels


def test_probe_and_equivariance_load_the_model_of_the_metadata(
    run_dir: Path, tmp_path: Path
) -> None:
    run = RunDir(run_dir)
    cfg = run.read_config()
    backbone = load_trained_encoder(run, cfg, 1, "backbone")
    whole = load_trained_encoder(run, cfg, 1, "projection")
    assert isinstance(backbone, ResNet) and not backbone.training
    assert isinstance(whole, Encoder) and not whole.training
    encoder = load_encoder(run_dir, "projection")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        x = encoder.preprocess(images)
        torch.testing.assert_close(whole(x), encoder(images))
        torch.testing.assert_close(backbone(x), load_encoder(run_dir)(images))
    # evaluation does not need the training's activation checkpointing
    checkpointed = dataclasses.replace(cfg, activation_checkpointing=True)
    assert isinstance(load_trained_encoder(run, checkpointed, 1, "backbone"), ResNet)


def test_bad_metadata_is_refused_by_probe_and_equivariance_too(
    run_dir: Path, tmp_path: Path
) -> None:
    run = _copy(run_dir, tmp_path)
    _set_metadata(run.backbone, std="[0.0]")  # all-NaN features, if it were trusted
    with pytest.raises(CareError) as caught:
        load_trained_encoder(run, run.read_config(), 1, "backbone")
    assert f"weights file {run.backbone} has invalid care metadata" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("embedding", "hyperboloid"), ("curvature", 2.0), ("widths", [4, 4, 8, 16])],
)
def test_a_config_that_disagrees_with_the_weights_is_refused(
    run_dir: Path, tmp_path: Path, key: str, value: object
) -> None:
    run = _copy(run_dir, tmp_path)
    cfg = run.read_config()
    run.write_config(dataclasses.replace(cfg, **{key: value}))
    edited = run.read_config()
    with pytest.raises(CareError) as caught:
        load_trained_encoder(run, edited, 1, "projection")
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"{run.config} and {run.backbone} disagree on '{key}'" in message, message


def test_care_probe_names_both_files_when_they_disagree(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(run_dir, tmp_path)
    run.write_config(dataclasses.replace(run.read_config(), head_out=16))
    assert main(["probe", str(run.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"{run.config} and {run.backbone} disagree on 'head_out'" in err, err


def test_data_of_other_channels_is_refused(run_dir: Path) -> None:
    run = RunDir(run_dir)
    with pytest.raises(CareError, match="takes 1-channel images"):
        load_trained_encoder(run, run.read_config(), 3, "backbone")


def test_a_run_without_metadata_is_rebuilt_from_its_config(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    for path in (run.backbone, run.head):
        save_file(load_file(str(path)), str(path))  # as runs written before metadata
    assert read_weights(run.backbone)[1] == {}
    whole = load_trained_encoder(run, run.read_config(), _channels(run), "projection")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = load_encoder(run_dir, "projection")(images)
        torch.testing.assert_close(whole(load_encoder(run.root).preprocess(images)), expected)
    _change_tensors(run.backbone, _reshape)
    message = _refused(run)
    assert message.startswith(f"weights file {run.backbone} does not match the encoder that")
