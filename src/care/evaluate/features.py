"""Frozen-encoder features of a labelled split, with a progress bar in images per second."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import Tensor, nn
from torch.utils.data import DataLoader

from care.augment.eval import eval_transform
from care.data import DataInfo, LabeledImages
from care.hardware import autocast_for


class ImagesPerSecond(ProgressColumn):
    """The progress bar's speed in images per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("– images/s" if speed is None else f"{speed:,.0f} images/s")


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
) -> tuple[Tensor, Tensor]:
    """``module`` applied to every image after ``preprocess`` (a :class:`DataInfo`: its eval
    transform; or a callable on the images as stored), in eval mode, under autocast for a mixed
    ``precision``, in ``memory_format``: (float32 features, labels) on the CPU.

    Images are read by ``num_workers`` DataLoader workers (0: in this process), into pinned
    memory when ``device`` is CUDA, and copied to ``device`` without blocking the host. On a
    terminal a progress bar on stderr shows images per second (none in a file or a pipe).
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
    console = Console(stderr=True)  # stdout keeps the commands' result lines alone
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeRemainingColumn(),
    )
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:
        task = progress.add_task(description, total=len(dataset))
        for images, y in loader:
            x = preprocess(images.to(device, non_blocking=pin))
            x = x.contiguous(memory_format=memory_format)
            with autocast_for(precision, device):
                features.append(module(x).float().cpu())
            labels.append(y)
            progress.advance(task, len(y))
    module.train(was_training)
    return torch.cat(features), torch.cat(labels)
