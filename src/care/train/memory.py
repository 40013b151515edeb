"""Will a training step fit in memory? An estimate made before the run starts.

A step's memory is dominated by the activations autograd keeps for the backward pass. They are
measured, not guessed: one forward pass of the run's encoder on two images, at the run's image
size and precision, on the run's device, counts the bytes of every tensor autograd saves
(:func:`activation_bytes_per_image`). Every method embeds one pair of views at a time with
gradients (``views=separate`` backpropagates InfoNCE's pair before it embeds the group-shared
pair: :mod:`care.methods.base`), so a step keeps the activations of ``2 × batch_size`` images.
To them :func:`estimate_step_memory` adds the step's augmented views, the loaded batch, the
weights with their gradients and optimiser state (and MoCo's key encoder and queue), and, on the
CPU, the process's own footprint.

:func:`check_step_fits` compares the estimate with the memory this process may use (the GPU's
memory on CUDA; on the CPU the machine's or its cgroup's limit, shared by the processes of a
node) and refuses a run that cannot fit in one line that names what to change. The available
memory it uses is a fixed property of the machine (total, not free), so every rank of a
distributed run decides alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from care.config import Config
from care.data import DataInfo
from care.errors import CareError
from care.hardware import autocast_for, device_type
from care.models import build_encoder

GIB = 1024**3

#: Bytes the training process needs besides the step (the interpreter, torch's libraries and
#: allocator caches, the data loader): measured on the CPU preset (docs/benchmarks.md).
CPU_PROCESS_BYTES = int(0.6 * GIB)
#: A step's transient buffers on top of the saved activations (the gradients flowing back
#: through the largest layers, convolution workspaces, allocator slack), as a share of the
#: activations the step would keep without checkpointing; measured against peak RSS in
#: ``benchmarks/step_memory.py`` (docs/benchmarks.md). With ``activation_checkpointing`` the
#: backward pass also recomputes each part's activations next to those buffers, so they weigh
#: more against what the forward kept.
TRANSIENT_SHARE = 0.7
CHECKPOINTING_TRANSIENT_SHARE = 0.85
#: Optimiser state per parameter, in copies of the weights.
OPTIMIZER_COPIES = {"adam": 2, "sgd": 1, "lars": 1}


@dataclass(frozen=True)
class StepMemory:
    """The estimated bytes of one training step, by what holds them."""

    activations: int  # kept for the backward pass: 2 × batch_size images' worth
    transient: int  # buffers of the backward pass on top of them
    views: int  # the step's augmented views (float32) and the loaded batch (uint8)
    model: int  # weights, gradients, optimiser state; MoCo's key encoder and queue
    process: int  # the process itself (CPU only)
    activation_per_image: int

    @property
    def total(self) -> int:
        return self.activations + self.transient + self.views + self.model + self.process


def _segments(encoder: nn.Module) -> list[nn.Module]:
    """The parts ``activation_checkpointing`` recomputes (the stem and each residual block)."""
    backbone = getattr(encoder, "backbone", None)
    stem, layers = getattr(backbone, "stem", None), getattr(backbone, "layers", None)
    if not isinstance(stem, nn.Module) or not isinstance(layers, nn.Sequential):
        return []
    return [stem, *layers]


def activation_bytes_per_image(
    encoder: nn.Module,
    channels: int,
    image_size: int,
    *,
    precision: str = "32",
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    checkpointing: bool = False,
) -> int:
    """Bytes autograd keeps per image after a training forward of ``encoder`` (in train mode,
    under ``precision``'s autocast on ``device``), measured on two images.

    Saved tensors are counted once per storage, the weights not at all. With ``checkpointing``
    the stem and each block keep only their input, and the backward pass recomputes one of them
    at a time: the count is then the inputs of those parts, the largest part's own activations
    and what lies outside them (the head).
    """
    device = torch.device(device)
    weights = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    sizes: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage → the part whose forward saved it (-1: outside)
    inputs: list[int] = []
    segments = _segments(encoder) if checkpointing else []
    active = [-1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in weights and key not in sizes:
            sizes[key] = storage.nbytes()
            owner[key] = active[0]
        return tensor

    def enter(index: int) -> object:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            active[0] = index
            inputs.append(args[0].untyped_storage().nbytes())

        return hook

    def leave(module: nn.Module, args: object, output: object) -> None:
        active[0] = -1

    handles = []
    for i, segment in enumerate(segments):
        handles.append(segment.register_forward_pre_hook(enter(i)))  # type: ignore[arg-type]
        handles.append(segment.register_forward_hook(leave))
    images = torch.rand(2, channels, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    was_training = encoder.training
    encoder.train()
    try:
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast_for(precision, device),
        ):
            encoder(images)
    finally:
        encoder.train(was_training)
        for handle in handles:
            handle.remove()
    if not segments:
        return sum(sizes.values()) // 2
    per_part = [0] * len(segments)
    outside = 0
    for key, size in sizes.items():
        if owner[key] < 0:
            outside += size
        else:
            per_part[owner[key]] += size
    return (sum(inputs) + max(per_part) + outside) // 2


def estimate_step_memory(cfg: Config, info: DataInfo, stored_side: int) -> StepMemory:
    """The memory of one training step of ``cfg`` on data described by ``info`` whose images are
    stored ``stored_side`` pixels wide, on the device the run trains on."""
    device = training_device(cfg)
    encoder = build_encoder(cfg, info.channels).to(device)
    # measured whole: checkpointing is accounted for from the parts' own activations
    # (torch's checkpoint would hide them from the saved-tensor hooks)
    encoder.backbone.activation_checkpointing = False
    memory_format = torch.channels_last if cfg.memory_format == "channels_last" else None
    if memory_format is not None:
        encoder.to(memory_format=memory_format)  # type: ignore[call-overload]

    def per_image(checkpointing: bool) -> int:
        return activation_bytes_per_image(
            encoder,
            info.channels,
            info.image_size,
            precision=cfg.precision,
            device=device,
            memory_format=memory_format or torch.contiguous_format,
            checkpointing=checkpointing,
        )

    batch = cfg.batch_size
    full = per_image(False) * 2 * batch  # one pair of views at a time, with gradients
    kept = per_image(True) * 2 * batch if cfg.activation_checkpointing else full
    share = CHECKPOINTING_TRANSIENT_SHARE if cfg.activation_checkpointing else TRANSIENT_SHARE
    four_views = cfg.method in ("care", "care_moco", "equi_unif") and cfg.views == "separate"
    pixels = info.channels * info.image_size**2
    views = (4 if four_views else 2) * batch * pixels * 4 + batch * info.channels * stored_side**2
    params = sum(p.numel() for p in encoder.parameters()) * 4
    model = params * (2 + OPTIMIZER_COPIES.get(cfg.optimizer, 2))
    if cfg.method in ("moco", "care_moco"):
        model += params + cfg.queue_size * cfg.head_out * 4
    return StepMemory(
        activations=kept,
        transient=int(share * full),
        views=views,
        model=model,
        process=CPU_PROCESS_BYTES if device.type == "cpu" else 0,
        activation_per_image=kept // (2 * batch),
    )


def training_device(cfg: Config) -> torch.device:
    """The device this process trains on (``cuda:LOCAL_RANK`` on a GPU node)."""
    kind = device_type(cfg.accelerator)
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device(kind)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None where there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def machine_memory() -> int | None:
    """The CPU memory this machine gives its processes: its RAM, or its cgroup's limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None
    limit = _cgroup_limit()
    return min(total, limit) if limit is not None else total


def available_memory(cfg: Config, device: torch.device) -> tuple[int, str] | None:
    """(bytes one training process may use, what they are) on ``device``; None where unknown.

    On CUDA the GPU's total memory; on the CPU the machine's memory shared by the node's
    ``devices`` processes.
    """
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device).total_memory
        return gpu, f"the {gpu / GIB:.1f} GiB of {torch.cuda.get_device_name(device)}"
    total = machine_memory() if device.type == "cpu" else None
    if total is None:
        return None
    if cfg.devices > 1:
        share = total // cfg.devices
        where = f"this machine's {total / GIB:.1f} GiB shared by {cfg.devices} processes"
        return share, f"{share / GIB:.1f} GiB ({where})"
    return total, f"this machine's {total / GIB:.1f} GiB"


def check_step_fits(cfg: Config, info: DataInfo, stored_side: int) -> StepMemory:
    """Refuse, in one line, a run whose step cannot fit in the memory it has; return the
    estimate otherwise."""
    estimate = estimate_step_memory(cfg, info, stored_side)
    device = training_device(cfg)
    available = available_memory(cfg, device)
    if available is None or estimate.total <= available[0]:
        return estimate
    budget, where = available
    fixed = estimate.total - estimate.activations - estimate.transient
    per_image = max(1, (estimate.activations + estimate.transient) // cfg.batch_size)
    largest = max(0, (budget - fixed) // per_image)
    step = cfg.group_size if cfg.method in ("care", "care_moco", "equi_unif") else 1
    fits = largest // step * step
    batch_hint = f"batch_size={fits} or less" if fits >= 2 else "a smaller batch_size"
    checkpointing = "" if cfg.activation_checkpointing else ", or activation_checkpointing=true"
    raise CareError(
        f"a training step needs about {estimate.total / GIB:.1f} GiB "
        f"({estimate.activation_per_image / 2**20:.1f} MiB of activations per image at "
        f"image_size={info.image_size}, batch_size={cfg.batch_size}), more than {where}: set "
        f"{batch_hint}, a smaller image_size{checkpointing}"
    )
