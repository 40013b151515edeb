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


# name, compute capability: bf16 is native from 8.0 (Ampere) on, emulated on Volta and Turing
GPUS = {
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0)),
    "V100": ("Tesla V100-SXM2-32GB", (7, 0)),
    "T4": ("Tesla T4", (7, 5)),
}
NATIVE_BF16 = {"A100": True, "V100": False, "T4": False}


def _cuda(monkeypatch: pytest.MonkeyPatch, gpu: str) -> None:
    """The CUDA queries answering as on ``gpu`` (a key of GPUS), as torch's own would: with its
    default ``including_emulation=True``, ``is_bf16_supported()`` is True on every one of them
    (a bf16 tensor can be made on a V100 or a T4; the arithmetic is emulated)."""
    name, capability = GPUS[gpu]

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return capability >= (8, 0) or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


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


def test_the_gpu_mock_counts_emulation_as_torch_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """What made V100s and T4s train in emulated bf16: the default query says yes on them."""
    for gpu in GPUS:
        _cuda(monkeypatch, gpu)
        assert torch.cuda.is_bf16_supported()
        assert torch.cuda.is_bf16_supported(including_emulation=False) is NATIVE_BF16[gpu]
        assert hardware.cuda_has_native_bf16() is NATIVE_BF16[gpu]


@pytest.mark.parametrize("gpu", list(GPUS))
def test_auto_on_cuda_is_bf16_where_native_and_fp16_elsewhere(
    gpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cuda(monkeypatch, gpu)
    native = NATIVE_BF16[gpu]
    assert hardware.device_type("auto") == hardware.device_type("gpu") == "cuda"
    assert resolve_precision("auto", "cuda") == ("bf16-mixed" if native else "16-mixed")
    assert resolve_precision("16-mixed", "cuda") == "16-mixed"
    assert resolve_precision("32", "cuda") == "32"
    assert resolve_memory_format("auto", "cuda") == "channels_last"
    assert runs_natively("bf16-mixed", "cuda") is native
    assert runs_natively("16-mixed", "cuda") and runs_natively("32", "cuda")


@pytest.mark.parametrize("gpu", list(GPUS))
def test_resolve_on_a_gpu_picks_its_mixed_precision(
    gpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cuda(monkeypatch, gpu)
    resolved = resolve(load_config(None, ["accelerator=gpu"]))
    expected = "bf16-mixed" if NATIVE_BF16[gpu] else "16-mixed"
    assert (resolved.precision, resolved.memory_format) == (expected, "channels_last")


@pytest.mark.parametrize("gpu", list(GPUS))
def test_evaluation_on_a_gpu_falls_back_from_emulated_bf16(
    gpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained in bf16 on an A100, probed on a V100 or a T4: at 32, not emulated bf16."""
    _cuda(monkeypatch, gpu)
    native = NATIVE_BF16[gpu]
    assert evaluation_precision("bf16-mixed", "cuda") == ("bf16-mixed" if native else "32")
    assert evaluation_precision("auto", "cuda") == ("bf16-mixed" if native else "16-mixed")
    assert evaluation_precision("16-mixed", "cuda") == "16-mixed"
    assert evaluation_precision("32", "cuda") == "32"
    assert evaluation_precision("bf16-mixed", "cuda", requested="16-mixed") == "16-mixed"


@pytest.mark.parametrize("gpu", ["V100", "T4"])
def test_bf16_on_a_gpu_that_emulates_it_is_a_one_line_error(
    gpu: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _cuda(monkeypatch, gpu)
    name, (major, minor) = GPUS[gpu]
    fix = "use precision=16-mixed or precision=32 on this GPU"
    for refused in (
        lambda: resolve_precision("bf16-mixed", "cuda"),
        lambda: evaluation_precision("32", "cuda", requested="bf16-mixed"),
        lambda: resolve(load_config(None, ["accelerator=gpu", "precision=bf16-mixed"])),
    ):
        with pytest.raises(CareError) as error:
            refused()
        message = str(error.value)
        assert "\n" not in message and message.endswith(fix), message
        assert "precision=bf16-mixed needs a GPU with native bf16" in message
        assert f"{name}, compute capability {major}.{minor}" in message
    argv = ["pretrain", "--print-config", "accelerator=gpu", f"out={tmp_path / 'run'}"]
    fails_with_one_line(capsys, [*argv, "precision=bf16-mixed"], fix)
    assert main(argv) == 0  # auto: fp16 with a gradient scaler
    assert OmegaConf.create(capsys.readouterr().out).precision == "16-mixed"


def test_bf16_on_a_gpu_that_has_it_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, "A100")
    assert resolve_precision("bf16-mixed", "cuda") == "bf16-mixed"
    assert evaluation_precision("32", "cuda", requested="bf16-mixed") == "bf16-mixed"


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
    _cuda(monkeypatch, "T4")
    with pytest.raises(CareError, match=r"native bf16 \(Ampere or newer.*16-mixed or precision=32"):
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
