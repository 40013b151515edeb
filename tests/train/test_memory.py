"""The memory a training step needs, estimated before the run, and the one-line refusal of a
step that cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import care.train.memory as memory
from care.config import load_config
from care.data import DataInfo
from care.hardware import resolve
from care.train.memory import GIB, activation_bytes_per_image, estimate_step_memory
from tests.conftest import fails_with_one_line, tiny


def test_saved_activations_are_counted_exactly_once_and_weights_not_at_all() -> None:
    """A convolution saves its input, a ReLU its output, a linear layer its input; the weights
    are the module's own and not counted. Two images of 1 × 8 × 8, float32."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)
    )
    conv_input = 1 * 8 * 8 * 4
    relu_output = 4 * 8 * 8 * 4  # also the Linear's (flattened) input: the same storage
    assert activation_bytes_per_image(net, 1, 8) == conv_input + relu_output


def _cfg(*overrides: str) -> memory.Config:
    return resolve(load_config(None, ["precision=32", "accelerator=cpu", *overrides]))


def test_the_estimate_scales_with_the_batch_and_the_image_and_checkpointing_lowers_it() -> None:
    info = DataInfo(3, 32, (0.5,) * 3, (0.5,) * 3, 10)
    base = estimate_step_memory(_cfg("batch_size=64"), info, 32)
    double = estimate_step_memory(_cfg("batch_size=128"), info, 32)
    assert double.activations == 2 * base.activations  # one pair of views: 2 × batch images
    assert double.model == base.model
    larger = estimate_step_memory(
        _cfg("batch_size=64"), DataInfo(3, 64, info.mean, info.std, 10), 64
    )
    assert 3.5 < larger.activation_per_image / base.activation_per_image < 4.5  # 4× the pixels
    light = estimate_step_memory(_cfg("batch_size=64", "activation_checkpointing=true"), info, 32)
    assert light.activation_per_image < 0.7 * base.activation_per_image
    moco = estimate_step_memory(_cfg("batch_size=64", "method=moco", "queue_size=4096"), info, 32)
    assert moco.model > base.model  # the key encoder and the queue


def test_a_step_that_cannot_fit_is_refused_in_one_line(
    fake_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "machine_memory", lambda: int(0.3 * GIB))
    out = tmp_path / "run"
    fails_with_one_line(
        capsys,
        ["pretrain", *tiny(fake_fmnist, out), "batch_size=64", "group_size=16"],
        "a training step needs about",
    )
    assert not out.exists()  # refused before anything was written


def test_the_refusal_names_what_to_set(fake_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, tiny(fake_fmnist, Path("r"), "batch_size=64", "group_size=16"))
    cfg = resolve(cfg)
    info = DataInfo(1, 28, (0.5,), (0.5,), 10)
    need = estimate_step_memory(cfg, info, 28)
    fixed = need.total - need.activations - need.transient
    # room for the fixed part and 40 images' activations: 32 images, whole groups of 16
    room = fixed + 40 * (need.activations + need.transient) // 64
    monkeypatch.setattr(memory, "machine_memory", lambda: room)
    with pytest.raises(memory.CareError) as refused:
        memory.check_step_fits(cfg, info, 28)
    message = str(refused.value)
    assert "batch_size=32 or less" in message and "image_size" in message
    assert "activation_checkpointing=true" in message and "\n" not in message
    monkeypatch.setattr(memory, "machine_memory", lambda: need.total)
    assert memory.check_step_fits(cfg, info, 28).total == need.total  # it fits: no refusal


def test_cpu_processes_of_one_node_share_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "machine_memory", lambda: 8 * GIB)
    one = memory.available_memory(_cfg(), torch.device("cpu"))
    two = memory.available_memory(_cfg("devices=2", "strategy=ddp"), torch.device("cpu"))
    assert one is not None and two is not None and two[0] == one[0] // 2
    assert "shared by 2 processes" in two[1]
