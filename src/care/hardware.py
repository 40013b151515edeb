"""What the hardware can do, and the settings ``auto`` resolves to on it.

``precision=auto`` and ``memory_format=auto`` are resolved once, before a run starts, from the
accelerator the run will use (:func:`resolve`): the resolved values are what ``config.yaml``,
``summary.json`` and ``--print-config`` show, and what ``resume=true`` compares.

- ``precision=auto`` is ``bf16-mixed`` where bf16 runs natively: a CUDA GPU of compute capability
  8.0 or newer (Ampere: A100, and later) or a CPU with avx512_bf16 or AMX. On an older CUDA GPU
  (Volta: V100, 7.0; Turing: T4, 7.5) bf16 is only emulated, so ``auto`` is ``16-mixed`` there
  (fp16 on the tensor cores, with Lightning's gradient scaler) and an explicit ``bf16-mixed`` is
  refused; :func:`cuda_has_native_bf16` is the one test of it
  (``torch.cuda.is_bf16_supported()`` alone counts emulation). Elsewhere ``auto`` is ``32``: on
  a CPU without avx512_bf16 or AMX oneDNN emulates bf16, many times slower than float32.
- ``memory_format=auto`` is ``channels_last`` on CUDA (tensor-core convolutions read NHWC; it is
  NVIDIA's and PyTorch's advice for mixed precision) and on x86 CPUs with AVX2 or AVX-512, where
  oneDNN's NHWC convolutions made a CPU-preset step faster in fp32 and in bf16
  (``benchmarks/throughput.py --compare``, figures in docs/benchmarks.md), and ``contiguous``
  elsewhere (other CPUs, MPS), where it was not measured.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from care.config import CHOICES, Config, with_overrides
from care.errors import CareError

__all__ = [
    "autocast_for",
    "autocast_off",
    "configure_backends",
    "cpu_has_avx2",
    "cpu_has_native_bf16",
    "cuda_has_native_bf16",
    "device_type",
    "evaluation_device",
    "evaluation_precision",
    "requested_precision",
    "resolve",
    "resolve_memory_format",
    "resolve_precision",
    "runs_natively",
    "torch_memory_format",
]


def autocast_off(device: torch.device | str) -> AbstractContextManager[object]:
    """A context in which autocast is off for ``device``'s type: code that must compute in
    float32 under mixed precision (the augmentations, the losses) runs inside it."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); without, oneDNN emulates it."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cuda_has_native_bf16() -> bool:
    """Whether the CUDA GPU computes bf16 natively (compute capability 8.0 and newer, Ampere on).
    Volta and Turing (V100, T4) only emulate it, which ``torch.cuda.is_bf16_supported()`` counts
    as support unless called with ``including_emulation=False``."""
    if not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _cuda_gpu() -> str:
    """The CUDA GPU, for a message: its name and compute capability."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_type(accelerator: str) -> str:
    """The device type (``cuda``, ``mps`` or ``cpu``) a run with ``accelerator`` trains on,
    as Lightning picks it for ``auto`` and ``gpu``."""
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "gpu", "mps") and _mps_available():
        return "mps"
    if accelerator == "auto":
        return "cpu"
    raise CareError(
        f"accelerator={accelerator} is not available on this machine (no "
        f"{'CUDA GPU' if accelerator in ('gpu', 'cuda') else 'MPS device'} that PyTorch can use): "
        "set accelerator=cpu, or install a PyTorch build for your GPU"
    )


def evaluation_device(cfg: Config) -> torch.device:
    """The device an evaluation (``care probe``, ``care equivariance``) embeds images on: CUDA
    when ``cfg.accelerator`` allows a GPU (auto, gpu, cuda) and one is available, else the CPU."""
    if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: str) -> str:
    """``precision``, with ``auto`` resolved for ``device``; a precision the device cannot run
    is a :class:`CareError` naming the fix."""
    if precision == "auto":
        if runs_natively("bf16-mixed", device):
            return "bf16-mixed"
        return "16-mixed" if device == "cuda" else "32"
    if precision == "bf16-mixed" and device == "cuda" and not cuda_has_native_bf16():
        raise CareError(
            f"precision=bf16-mixed needs a GPU with native bf16 (Ampere or newer, compute "
            f"capability 8.0+); this one ({_cuda_gpu()}) would only emulate it: "
            "use precision=16-mixed or precision=32 on this GPU"
        )
    if precision == "16-mixed" and device == "cpu":
        raise CareError(
            "precision=16-mixed needs a CUDA GPU (there is no fp16 mixed precision on the CPU): "
            "use precision=bf16-mixed or precision=32 on the CPU"
        )
    if precision == "16-mixed" and device == "mps":
        raise CareError("precision=16-mixed is not supported on MPS here: use precision=32")
    return precision


def runs_natively(precision: str, device: str) -> bool:
    """Whether ``device`` runs ``precision`` without emulation (32 runs everywhere)."""
    if precision == "bf16-mixed":
        if device == "cuda":
            return cuda_has_native_bf16()
        return device == "cpu" and cpu_has_native_bf16()
    if precision == "16-mixed":
        return device == "cuda"
    return precision == "32"


def evaluation_precision(saved: str, device: str, requested: str | None = None) -> str:
    """The precision an evaluation embeds images at on ``device``.

    ``requested`` (from the command line) is resolved like a training precision, so one the
    device cannot run is a :class:`CareError`. Without it, the run's ``saved`` precision is
    used where ``device`` runs it natively and 32 elsewhere, so a run trained in bf16 on a GPU
    is still evaluated at full speed on a CPU without native bf16.
    """
    if requested is not None:
        return resolve_precision(requested, device)
    if saved == "auto":
        return resolve_precision("auto", device)
    return saved if runs_natively(saved, device) else "32"


def requested_precision(value: object) -> str | None:
    """A ``precision=`` given to an evaluation command, checked (None if not given)."""
    if value is None:
        return None
    text = str(value)
    if text not in CHOICES["precision"]:
        raise CareError(
            f"bad value for 'precision': {text!r}; choose one of {list(CHOICES['precision'])}"
        )
    return text


def autocast_for(precision: str, device: torch.device | str) -> AbstractContextManager[object]:
    """Autocast to bf16 or fp16 on ``device`` for a mixed ``precision``; nothing for 32."""
    device_type = torch.device(device).type
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    return nullcontext()


def cpu_has_avx2() -> bool:
    """Whether PyTorch runs this CPU's kernels with AVX2 or AVX-512 (an x86 CPU since ~2013)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def resolve_memory_format(memory_format: str, device: str) -> str:
    """``memory_format``, with ``auto`` resolved for ``device`` (NHWC measured faster in fp32 and
    in bf16 wherever it is picked)."""
    if memory_format != "auto":
        return memory_format
    if device == "cuda" or (device == "cpu" and cpu_has_avx2()):
        return "channels_last"
    return "contiguous"


def resolve(cfg: Config) -> Config:
    """``cfg`` with ``precision`` and ``memory_format`` resolved for the accelerator it names."""
    device = device_type(cfg.accelerator)
    precision = resolve_precision(cfg.precision, device)
    memory_format = resolve_memory_format(cfg.memory_format, device)
    if (precision, memory_format) == (cfg.precision, cfg.memory_format):
        return cfg
    return with_overrides(cfg, {"precision": precision, "memory_format": memory_format})


def torch_memory_format(name: str) -> torch.memory_format:
    """``channels_last`` or ``contiguous`` as a torch memory format (``auto`` resolved first)."""
    if name == "auto":
        raise ValueError("memory_format=auto must be resolved first (care.hardware.resolve)")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def configure_backends(cfg: Config) -> None:
    """CUDA's global switches from ``cfg``: cuDNN autotuning and TF32 tensor cores for float32
    matmuls and convolutions (both on by default; no effect on the CPU)."""
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
