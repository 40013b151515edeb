"""The deterministic evaluation transform: centre crop (for decoded folders), resize, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional


def eval_transform(
    images: Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_fraction: float = 1.0,
) -> Tensor:
    """uint8 (B,C,H,W) → normalised float32 (B,C,size,size).

    The central ``crop_fraction`` of the image is kept (e.g. 224/256 for ImageNet-style folders)
    and resized to ``size`` if needed.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    if crop_fraction < 1.0:
        ch, cw = round(h * crop_fraction), round(w * crop_fraction)
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    if x.shape[-2:] != (size, size):
        x = functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
