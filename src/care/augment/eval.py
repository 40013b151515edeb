"""The deterministic evaluation transform: centre crop (for decoded folders), resize, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional

from care.errors import CareError

#: How far float pixels may stray outside [0, 1] (resampling overshoot) before a batch is refused.
PIXEL_RANGE_SLACK = 0.1


def check_pixel_range(images: Tensor, what: str = "images") -> None:
    """Refuse float ``images`` clearly outside [0, 1] (0..255 values cast to float, or images
    already normalised) with one :class:`CareError` line; uint8 images pass unchecked.

    The check reads the values (``aminmax``), so on an accelerator it waits for the device:
    callers on a training path run it once, not per step (see :class:`PixelRangeGuard`).
    """
    if not images.is_floating_point() or images.numel() == 0:
        return
    low, high = torch.aminmax(images.detach())
    low_value, high_value = float(low), float(high)
    if low_value < -PIXEL_RANGE_SLACK or high_value > 1.0 + PIXEL_RANGE_SLACK:
        raise CareError(
            f"{what} are float with values in [{low_value:.3g}, {high_value:.3g}]: pass uint8 in "
            "0..255 or float in [0, 1] (e.g. images.float() / 255), not normalised images"
        )


class PixelRangeGuard:
    """:func:`check_pixel_range` at a cost that stays off the hot path: every float batch on the
    CPU (no device to wait for), and only the first float batch on an accelerator (one host
    sync per guard, not one per step)."""

    def __init__(self, what: str = "images") -> None:
        self.what = what
        self.checked_on_device = False

    def __call__(self, images: Tensor) -> None:
        if not images.is_floating_point() or images.numel() == 0:
            return  # an empty batch shows nothing and does not use up the accelerator's check
        if images.device.type != "cpu":
            if self.checked_on_device:
                return
            self.checked_on_device = True
        check_pixel_range(images, self.what)


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
