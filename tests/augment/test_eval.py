"""The evaluation transform: centre crop, resize and normalisation, checked value by value."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from care.augment.eval import eval_transform

MEAN = [0.2, 0.5, 0.7]
STD = [0.1, 0.3, 0.25]


def distinct_images(b: int, c: int, h: int, w: int) -> Tensor:
    """uint8 images whose pixels all differ within each channel of each image."""
    assert h * w <= 256
    g = torch.Generator().manual_seed(0)
    planes = [torch.randperm(256, generator=g)[: h * w] for _ in range(b * c)]
    return torch.stack(planes).to(torch.uint8).view(b, c, h, w)


def normalise(x: Tensor) -> Tensor:
    """uint8 → float in [0, 1] → (x - mean) / std, by channel."""
    m = torch.tensor(MEAN).view(1, -1, 1, 1)
    s = torch.tensor(STD).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def test_centre_crop_keeps_the_central_box() -> None:
    images = distinct_images(2, 3, 10, 10)
    out = eval_transform(images, size=6, mean=MEAN, std=STD, crop_fraction=0.6)
    # round(10 * 0.6) = 6 pixels, starting at (10 - 6) // 2 = 2.
    torch.testing.assert_close(out, normalise(images[:, :, 2:8, 2:8]), atol=1e-6, rtol=0)
    # One pixel off in either direction is a different box.
    for shifted in (images[:, :, 1:7, 2:8], images[:, :, 3:9, 2:8], images[:, :, 2:8, 1:7]):
        assert not torch.allclose(out, normalise(shifted), atol=1e-3)


def test_full_fraction_at_the_stored_size_only_normalises() -> None:
    images = distinct_images(2, 3, 6, 6)
    out = eval_transform(images, size=6, mean=MEAN, std=STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 6, 6)
    torch.testing.assert_close(out, normalise(images), atol=1e-6, rtol=0)
    # Float input in [0, 1] is taken as is.
    floats = eval_transform(images.float() / 255.0, size=6, mean=MEAN, std=STD)
    torch.testing.assert_close(floats, out, atol=1e-6, rtol=0)


def test_crop_then_resize_to_another_size() -> None:
    images = distinct_images(1, 1, 12, 12)
    out = eval_transform(images, size=5, mean=[0.5], std=[0.25], crop_fraction=0.75)
    # round(12 * 0.75) = 9 pixels from (12 - 9) // 2 = 1, then an antialiased bilinear resize.
    box = images[:, :, 1:10, 1:10].float() / 255.0
    resized = F.interpolate(box, size=(5, 5), mode="bilinear", align_corners=False, antialias=True)
    assert out.shape == (1, 1, 5, 5)
    torch.testing.assert_close(out, (resized - 0.5) / 0.25, atol=1e-5, rtol=0)
    shifted = images[:, :, 2:11, 1:10].float() / 255.0
    wrong = F.interpolate(
        shifted, size=(5, 5), mode="bilinear", align_corners=False, antialias=True
    )
    assert not torch.allclose(out, (wrong - 0.5) / 0.25, atol=1e-3)


def test_odd_offsets_round_down() -> None:
    images = distinct_images(1, 3, 9, 9)
    out = eval_transform(images, size=4, mean=MEAN, std=STD, crop_fraction=0.5)
    # round(9 * 0.5) = round(4.5) = 4 (half to even); top = left = (9 - 4) // 2 = 2.
    assert round(9 * 0.5) == 4
    torch.testing.assert_close(out, normalise(images[:, :, 2:6, 2:6]), atol=1e-6, rtol=0)
    assert not torch.allclose(out, normalise(images[:, :, 3:7, 3:7]), atol=1e-3)


def test_non_square_crop_uses_each_side() -> None:
    images = distinct_images(1, 1, 10, 20)
    out = eval_transform(images, size=5, mean=[0.0], std=[1.0], crop_fraction=0.5)
    # h: round(5) = 5 from 2; w: round(10) = 10 from 5; then resized to 5x5.
    box = images[:, :, 2:7, 5:15].float() / 255.0
    resized = F.interpolate(box, size=(5, 5), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, resized, atol=1e-5, rtol=0)
