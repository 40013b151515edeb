"""Mixed precision on every path a user runs: every method on 1- and 3-channel data, both
embeddings, the blur's two kernels, ``care probe`` and ``care equivariance``; bf16 through the
real ``care pretrain`` on the CPU, fp16 with its gradient scaler through Lightning's plugin."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from safetensors.torch import load_file

from care.cli import main
from care.config import load_config
from care.data import DataInfo, EpochSampler, make_loader
from care.evaluate.features import extract_features
from care.methods import ContrastiveMethod, build_method
from tests.conftest import tiny
from tests.data.test_cifar import write_cifar10
from tests.train.helpers import bare_trainer, noise_images

METHODS = {
    "simclr": ("method=simclr",),
    "care-separate": ("method=care", "views=separate"),
    "care-shared": ("method=care", "views=shared"),
    "equi_unif": ("method=equi_unif",),
    "moco": ("method=moco", "queue_size=64"),
    "care_moco-separate": ("method=care_moco", "views=separate", "queue_size=64"),
    "care_moco-shared": ("method=care_moco", "views=shared", "queue_size=64"),
    "care-hyperboloid": ("method=care", "embedding=hyperboloid"),
    "care-lars-checkpointed": ("method=care", "optimizer=lars", "activation_checkpointing=true"),
}


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """65 training and 13 test RGB images of 32 px in CIFAR-10's python format."""
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, per_batch=13)
    return root


def _data(channels: int, fake_fmnist: Path, fake_cifar10: Path) -> tuple[str, ...]:
    if channels == 1:
        return (f"data_root={fake_fmnist}",)
    return ("dataset=cifar10", f"data_root={fake_cifar10}")


def _pretrain_bf16(out: Path, data: tuple[str, ...], *extra: str) -> dict[str, object]:
    args = tiny(Path("."), out, "precision=bf16-mixed", "memory_format=channels_last")
    args = [a for a in args if not a.startswith("data_root=")]
    args += [*data, "train_samples=64", "knn_bank_samples=32", *extra]
    assert main(["pretrain", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16-mixed" and summary["memory_format"] == "channels_last"
    assert summary["steps"] == 2
    with (out / "metrics.csv").open() as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    for weights in ("backbone", "head"):
        tensors = load_file(out / f"{weights}.safetensors")
        floats = [t for t in tensors.values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)
    return summary


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_in_bf16_on_grayscale_and_rgb(
    name: str, channels: int, fake_fmnist: Path, fake_cifar10: Path, tmp_path: Path
) -> None:
    _pretrain_bf16(tmp_path / "run", _data(channels, fake_fmnist, fake_cifar10), *METHODS[name])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 64])
def test_bf16_at_both_blur_kernels(
    size: int, channels: int, fake_fmnist: Path, fake_cifar10: Path, tmp_path: Path
) -> None:
    """16 px blurs with a 3-tap 2-D kernel, 64 px with two 7-tap passes (care.augment.ops)."""
    data = _data(channels, fake_fmnist, fake_cifar10)
    _pretrain_bf16(tmp_path / "run", data, "method=care", f"image_size={size}")


@pytest.mark.parametrize("channels", [1, 3])
def test_probe_and_equivariance_of_a_bf16_run(
    channels: int,
    fake_fmnist: Path,
    fake_cifar10: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    _pretrain_bf16(run, _data(channels, fake_fmnist, fake_cifar10), "method=care")
    capsys.readouterr()
    assert main(["probe", str(run), "precision=bf16-mixed", "probe_seeds=1"]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    probe = json.loads(Path(written).read_text())
    assert probe["features"]["precision"] == "bf16-mixed"
    assert 0.0 <= probe["linear"]["mean"] <= 100.0
    assert main(["probe", str(run), "precision=32", "probe_seeds=1"]) == 0
    written = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
    assert written.endswith("precision=32.json")  # the bf16 probe is kept beside it
    assert json.loads(Path(written).read_text())["features"]["precision"] == "32"
    args = ["equivariance", str(run), "trials=2", "samples=16", "compositions=1"]
    assert main([*args, "precision=bf16-mixed"]) == 0
    measured = json.loads((run / "equivariance.json").read_text())
    assert measured["precision"] == "bf16-mixed"
    assert all(math.isfinite(t["wahba_so"]) for t in measured["results"][0]["trials"])
    capsys.readouterr()


def test_features_are_computed_at_the_precision_asked_for() -> None:
    info = DataInfo(channels=3, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=2)
    data = noise_images(8, info)
    torch.manual_seed(0)
    backbone = build_method(load_config(None, ["widths=[4,4,8,8]"]), info).encoder.backbone
    full, labels = extract_features(backbone, data, info, precision="32")
    half, _ = extract_features(backbone, data, info, precision="bf16-mixed")
    assert full.dtype == half.dtype == torch.float32 and torch.equal(labels, data.labels)
    assert not torch.equal(full, half)  # bf16 matmuls and convolutions did run
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


# ------------------------------------------------------------- fp16 and its gradient scaler


def _one_step(method: ContrastiveMethod, plugin: MixedPrecision | None) -> None:
    images = noise_images(32, method.data)
    trainer = bare_trainer(max_steps=1, plugins=[plugin] if plugin else None)
    sampler = EpochSampler(len(images), method.cfg.seed)
    trainer.fit(method, make_loader(images, method.cfg, sampler))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "name", ["simclr", "care-separate", "care-shared", "equi_unif", "care_moco-separate"]
)
def test_fp16_with_its_gradient_scaler_steps_like_fp32(name: str, channels: int) -> None:
    """Lightning's 16-mixed plugin (on a GPU, what precision=16-mixed selects) scales each
    backward of the step and unscales before SGD steps: the first update matches fp32's."""
    info = DataInfo(
        channels=channels,
        image_size=16,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        num_classes=10,
    )
    overrides = ["widths=[4,4,8,8]", "head_hidden=16", "head_out=8", "batch_size=16"]
    overrides += ["group_size=8", "optimizer=sgd", "lr=0.5", "momentum=0", "weight=0.01"]
    cfg = load_config(None, [*overrides, "precision=32", "accelerator=cpu", *METHODS[name]])
    torch.manual_seed(0)
    start = build_method(cfg, info).state_dict()
    updates = {}
    for precision in ("32", "16-mixed"):
        method = build_method(cfg, info)
        method.load_state_dict(start)
        # (a small initial scale: at torch's 65536 the first steps overflow and are skipped)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if precision == "16-mixed" else None
        plugin = MixedPrecision("16-mixed", "cpu", scaler) if scaler else None
        _one_step(method, plugin)
        if scaler is not None:
            assert scaler.get_scale() == 256.0  # it scaled every backward; no step was skipped
        updates[precision] = {
            k: method.state_dict()[k] - v
            for k, v in start.items()
            if k.startswith("encoder.") and v.is_floating_point()
        }
    full, half = (torch.cat([u.flatten() for u in updates[p].values()]) for p in ("32", "16-mixed"))
    assert torch.isfinite(half).all() and full.norm() > 0
    # fp16 rounding turns the first update by a few degrees (cosine ~0.97 here; bf16's is
    # ~0.93); an update left scaled would be 256x too long, a skipped one zero.
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.9
    assert 0.8 < half.norm() / full.norm() < 1.25
