"""Frozen-encoder features of a labelled split, with progress in images per second
(:class:`care.progress.CommandProgress`: a live line on a terminal, a line every 30 s in a pipe)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from care.augment.eval import eval_transform
from care.data import DataInfo, LabeledImages
from care.hardware import autocast_for
from care.progress import CommandProgress


@torch.no_grad()
def extract_features(
    module: nn.Module,
    dataset: LabeledImages,
    preprocess: DataInfo | Callable[[Tensor], Tensor],
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "32",
    memory_format: torch.memory_format = torch.contiguous_format,
    num_workers: int = 0,
    description: str = "features",
    progress: CommandProgress | None = None,
) -> tuple[Tensor, Tensor]:
    """``module`` applied to every image after ``preprocess`` (a :class:`DataInfo`: its eval
    transform; or a callable on the images as stored), in eval mode, under autocast for a mixed
    ``precision``, in ``memory_format``: (float32 features, labels) on the CPU.

    Images are read by ``num_workers`` DataLoader workers (0: in this process), into pinned
    memory when ``device`` is CUDA, and copied to ``device`` without blocking the host. Progress
    in images per second goes to ``progress`` (one spanning a whole command), or to one of its
    own named ``description`` (on stderr: a live line on a terminal, a line every 30 s in a
    file or a pipe).
    """
    if isinstance(preprocess, DataInfo):
        info = preprocess

        def preprocess(images: Tensor) -> Tensor:
            return eval_transform(
                images, info.image_size, info.mean, info.std, info.eval_crop_fraction
            )

    device = torch.device(device)
    was_training = module.training
    module.eval().to(device)
    module.to(memory_format=memory_format)  # type: ignore[call-overload]
    features, labels = [], []
    pin = device.type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin
    )
    own = progress is None
    shown = CommandProgress(description, len(dataset)) if progress is None else progress
    try:
        for images, y in loader:
            x = preprocess(images.to(device, non_blocking=pin))
            x = x.contiguous(memory_format=memory_format)
            with autocast_for(precision, device):
                features.append(module(x).float().cpu())
            labels.append(y)
            shown.advance(len(y))
    finally:
        if own:
            shown.close()
    module.train(was_training)
    return torch.cat(features), torch.cat(labels)
