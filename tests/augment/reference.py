"""Naive references for the augmentation tests (not library code).

The image functions loop over the batch and follow torchvision's functional transforms
(``hflip``, ``adjust_brightness``/``contrast``/``saturation``, ``rgb_to_grayscale``) with the
luma weights of PIL's ``convert("L")``; the tests check the fused kernels of
:mod:`care.augment.ops` and the :class:`~care.augment.Augmenter` against them. The record
helpers build and slice :class:`~care.augment.AugParams` records.
"""

from __future__ import annotations

import torch
from torch import Tensor

from care.augment import AugParams

W_R, W_G, W_B = 0.299, 0.587, 0.114


def ref_gray(img: Tensor) -> Tensor:
    """Luma of one (C, H, W) image as (1, H, W); a 1-channel image is its own luma."""
    if img.shape[0] == 1:
        return img
    return W_R * img[0:1] + W_G * img[1:2] + W_B * img[2:3]


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """torchvision-semantics reference for testing the fused kernels: ``F.hflip`` of the rows
    where ``mask`` is true (mirrored left to right), the other rows unchanged."""
    return torch.stack(
        [img.flip(-1) if m else img for img, m in zip(images, mask.tolist(), strict=True)]
    )


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision-semantics reference for testing the fused kernels: ``clamp(f x, 0, 1)`` per
    image."""
    return torch.stack([(img * f).clamp(0, 1) for img, f in zip(x, factor, strict=True)])


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision-semantics reference for testing the fused kernels: each image blended with
    the mean of its luma, ``clamp(f x + (1 - f) mean, 0, 1)``."""
    out = []
    for img, f in zip(x, factor, strict=True):
        mean = ref_gray(img).mean()
        out.append((f * img + (1 - f) * mean).clamp(0, 1))
    return torch.stack(out)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision-semantics reference for testing the fused kernels: each image blended with
    its luma, ``clamp(f x + (1 - f) gray, 0, 1)``; a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    return torch.stack(
        [(f * img + (1 - f) * ref_gray(img)).clamp(0, 1) for img, f in zip(x, factor, strict=True)]
    )


def to_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """torchvision-semantics reference for testing the fused kernels: the rows where ``mask``
    is true replaced by their luma on every channel; a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    c = x.shape[1]
    return torch.stack(
        [
            ref_gray(img).expand(c, -1, -1) if m else img
            for img, m in zip(x, mask.tolist(), strict=True)
        ]
    )


def identity_params(n: int) -> AugParams:
    """``n`` records that leave an image unchanged (full crop, no flip, jitter, gray or blur)."""
    return AugParams(
        crop=torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool),
        brightness=torch.ones(n),
        contrast=torch.ones(n),
        saturation=torch.ones(n),
        hue=torch.zeros(n),
        jitter_order=torch.arange(4).repeat(n, 1),
        grayscale=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.zeros(n),
    )


def rows(params: AugParams, idx: Tensor | slice) -> AugParams:
    """Rows ``idx`` (an index tensor, a bool mask or a slice) of every field of ``params``."""
    return AugParams(**{k: v[idx] for k, v in params.as_dict().items()})
