"""Small builders the training tests share: a noise dataset and a bare Lightning Trainer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from care.data import DataInfo, TensorImages


def noise_images(n: int, info: DataInfo, seed: int = 0) -> TensorImages:
    """``n`` uint8 noise images of ``info``'s channels and size, labelled ``i % num_classes``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, info.channels, info.image_size, info.image_size)
    return TensorImages(
        torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8),
        torch.arange(n) % info.num_classes,
        name="noise",
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
    )


def bare_trainer(**settings: Any) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or validation; ``settings`` add
    to or override these."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **settings})
