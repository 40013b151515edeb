"""Frozen-backbone features of a labelled split, with a progress bar."""

from __future__ import annotations

import sys

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader

from care.augment.eval import eval_transform
from care.data import DataInfo, LabeledImages
from care.hardware import autocast_for


@torch.no_grad()
def extract_features(
    module: nn.Module,
    dataset: LabeledImages,
    info: DataInfo,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "32",
    memory_format: torch.memory_format = torch.contiguous_format,
    num_workers: int = 0,
    description: str = "features",
) -> tuple[Tensor, Tensor]:
    """``module`` applied to every image (eval transform, eval mode; under autocast for a mixed
    ``precision``, in ``memory_format``): (float32 features, labels) on the CPU.

    Images are read by ``num_workers`` DataLoader workers (0: in this process), into pinned
    memory when ``device`` is CUDA, and copied to ``device`` without blocking the host.
    """
    device = torch.device(device)
    was_training = module.training
    module.eval().to(device)
    module.to(memory_format=memory_format)  # type: ignore[call-overload]
    features, labels = [], []
    pin = device.type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin
    )
    # a live bar on a terminal; none in a file or a pipe (rich leaves a blank line there)
    with Progress(transient=True, disable=not sys.stdout.isatty()) as progress:
        task = progress.add_task(description, total=len(loader))
        for images, y in loader:
            x = eval_transform(
                images.to(device, non_blocking=pin),
                info.image_size,
                info.mean,
                info.std,
                info.eval_crop_fraction,
            ).contiguous(memory_format=memory_format)
            with autocast_for(precision, device):
                features.append(module(x).float().cpu())
            labels.append(y)
            progress.advance(task)
    module.train(was_training)
    return torch.cat(features), torch.cat(labels)
