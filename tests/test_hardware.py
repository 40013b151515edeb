"""What ``auto`` resolves to on each kind of machine, the precisions each device refuses, and the
CUDA switches; the resolved values are what a run records and ``--print-config`` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from care import hardware
from care.cli import main
from care.config import load_config
from care.errors import CareError
from care.hardware import (
    autocast_for,
    autocast_off,
    configure_backends,
    evaluation_precision,
    requested_precision,
    resolve,
    resolve_memory_format,
    resolve_precision,
    runs_natively,
    torch_memory_format,
)
from tests.conftest import fails_with_one_line, tiny


@pytest.fixture
def native_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An x86 CPU with avx512_bf16 (AVX-512 too)."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.fixture
def emulated_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An x86 CPU with AVX2 only."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def _cuda(monkeypatch: pytest.MonkeyPatch, *, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_bf16_and_nhwc_on_a_cpu_with_native_bf16(native_bf16_cpu: None) -> None:
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    assert resolve_memory_format("auto", "cpu") == "channels_last"


def test_auto_is_fp32_and_nhwc_on_an_avx2_cpu(emulated_bf16_cpu: None) -> None:
    assert resolve_precision("auto", "cpu") == "32"
    assert resolve_memory_format("auto", "cpu") == "channels_last"
    # An explicit bf16-mixed still runs there (pretrain warns that it is emulated).
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("capability", ["DEFAULT", "NO AVX", "SVE256"])
def test_auto_is_contiguous_on_cpus_where_nhwc_was_not_measured(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_memory_format("auto", "cpu") == "contiguous"
    assert resolve_memory_format("auto", "mps") == "contiguous"


def test_auto_on_cuda_follows_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, bf16=True)
    assert hardware.device_type("auto") == "cuda"
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_memory_format("auto", "cuda") == "channels_last"
    _cuda(monkeypatch, bf16=False)
    assert resolve_precision("auto", "cuda") == "32"
    assert resolve_precision("16-mixed", "cuda") == "16-mixed"


def test_explicit_settings_are_kept(native_bf16_cpu: None) -> None:
    for precision in ("32", "bf16-mixed"):
        assert resolve_precision(precision, "cpu") == precision
    for memory_format in ("contiguous", "channels_last"):
        assert resolve_memory_format(memory_format, "cpu") == memory_format


def test_precisions_a_device_cannot_run_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(CareError, match=r"16-mixed needs a CUDA GPU.*bf16-mixed or precision=32"):
        resolve_precision("16-mixed", "cpu")
    with pytest.raises(CareError, match="not supported on MPS"):
        resolve_precision("16-mixed", "mps")
    _cuda(monkeypatch, bf16=False)
    with pytest.raises(CareError, match=r"bf16 \(Ampere or newer\).*16-mixed or precision=32"):
        resolve_precision("bf16-mixed", "cuda")


def test_a_missing_gpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CareError, match=r"accelerator=gpu is not available.*accelerator=cpu"):
        hardware.device_type("gpu")
    assert hardware.device_type("auto") in ("cpu", "mps")


def test_resolve_fills_both_auto_settings_and_nothing_else(native_bf16_cpu: None) -> None:
    cfg = load_config(None, ["accelerator=cpu", "lr=0.1"])
    assert (cfg.precision, cfg.memory_format) == ("auto", "auto")  # the defaults
    resolved = resolve(cfg)
    assert (resolved.precision, resolved.memory_format) == ("bf16-mixed", "channels_last")
    assert resolved.lr == 0.1 and cfg.precision == "auto"  # a new config; the old one kept
    assert resolve(resolved) is resolved
    assert torch_memory_format(resolved.memory_format) is torch.channels_last
    with pytest.raises(ValueError, match="resolved first"):
        torch_memory_format(cfg.memory_format)


def test_evaluation_uses_the_runs_precision_where_it_runs_natively(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert evaluation_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert evaluation_precision("32", "cpu") == "32"
    assert evaluation_precision("16-mixed", "cpu") == "32"  # trained on a GPU, probed here
    assert evaluation_precision("32", "cpu", requested="bf16-mixed") == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert not runs_natively("bf16-mixed", "cpu") and runs_natively("32", "cpu")
    assert evaluation_precision("bf16-mixed", "cpu") == "32"  # emulated bf16 would be slower
    assert evaluation_precision("auto", "cpu") == "32"
    with pytest.raises(CareError, match="16-mixed needs a CUDA GPU"):
        evaluation_precision("32", "cpu", requested="16-mixed")


def test_requested_precision_is_checked() -> None:
    assert requested_precision(None) is None
    assert requested_precision(32) == "32"  # as YAML parses `precision=32`
    with pytest.raises(CareError, match="bad value for 'precision': 'fp8'"):
        requested_precision("fp8")


def test_autocast_helpers_switch_autocast_on_and_off() -> None:
    a = torch.randn(4, 4)
    with autocast_for("bf16-mixed", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
        with autocast_off("cpu"):
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for("32", "cpu"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("enabled", [True, False])
def test_cuda_switches_follow_the_config(enabled: bool) -> None:
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        value = str(enabled).lower()
        configure_backends(load_config(None, [f"cudnn_benchmark={value}", f"allow_tf32={value}"]))
        assert torch.backends.cudnn.benchmark is enabled
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cudnn.allow_tf32 is enabled
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved


def test_the_cuda_switches_are_on_by_default() -> None:
    cfg = load_config(None)
    assert cfg.cudnn_benchmark and cfg.allow_tf32


def test_print_config_shows_the_resolved_settings(
    native_bf16_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "--print-config", "accelerator=cpu"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert (printed.precision, printed.memory_format) == ("bf16-mixed", "channels_last")


def test_a_run_records_the_resolved_settings(
    emulated_bf16_cpu: None, fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = tiny(fake_fmnist, out, "precision=auto", "memory_format=auto", "knn_every=0")
    assert main(["pretrain", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["precision"], summary["memory_format"]) == ("32", "channels_last")
    saved = OmegaConf.load(out / "config.yaml")
    assert (saved.precision, saved.memory_format) == ("32", "channels_last")
    # resume=true with the default auto resolves to the same values, so it is the same run
    assert main(["pretrain", *args, "resume=true", "epochs=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_16_mixed_on_the_cpu_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fails_with_one_line(
        capsys,
        ["pretrain", *tiny(fake_fmnist, out, "precision=16-mixed")],
        "precision=16-mixed needs a CUDA GPU",
    )
    assert not out.exists()
