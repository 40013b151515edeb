"""The SimCLR augmentation pipeline on batched tensors, with group-shared parameters.

:class:`Augmenter` samples parameter records (:func:`care.augment.params.sample_params`) and
applies them with the kernels of :mod:`care.augment.ops` on the batch's own device. For CARE's
``L_equi`` a batch splits into groups of ``m`` consecutive images that share one record (paper,
Algorithm 1; design notes, "Group-shared augmentation").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from care.augment import ops
from care.augment.eval import PixelRangeGuard
from care.augment.params import AugmentRecipe, AugParams, check_groups, sample_params
from care.config import Config
from care.data import DataInfo
from care.errors import CareError
from care.hardware import autocast_off

__all__ = ["PAIRS_MODES", "Augmenter", "build_augmenter", "default_blur_kernel"]

#: ``per_group``: an independent record per group (the paper); ``per_batch``: one record for the
#: whole batch (what the official code's ``vmap(randomness="same")`` appears to do).
PAIRS_MODES = ("per_group", "per_batch")


def default_blur_kernel(output_size: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, rounded to the nearest odd int, at least 3."""
    return max(3, 2 * round((0.1 * output_size - 1) / 2) + 1)


class Augmenter:
    """Sample and apply SimCLR augmentations to uint8 or float image batches.

    Order: crop + resize -> flip -> colour jitter -> grayscale -> blur -> normalise. The output is
    float32 ``(B, C, output_size, output_size)`` normalised by ``(x - mean) / std``.

    uint8 images are in 0..255 and are never looked at. Float images must be in [0, 1]: a float
    batch clearly outside (0..255 values cast to float, or images already normalised) is refused
    by this instance's :class:`~care.augment.eval.PixelRangeGuard`, which reads every float batch
    on the CPU but only the first on an accelerator, so training never waits for the device
    after that. An empty batch (``B = 0``) gives an empty batch of views.
    """

    def __init__(
        self,
        recipe: AugmentRecipe,
        output_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        blur_kernel: int | None = None,
    ) -> None:
        if output_size < 1:
            raise CareError(f"augment: output_size={output_size} must be >= 1")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise CareError(
                f"augment: mean {list(mean)} and std {list(std)} need one value per "
                "channel (1 or 3 channels)"
            )
        if not all(math.isfinite(v) for v in (*mean, *std)):
            raise CareError(
                f"augment: mean {list(mean)} and std {list(std)} must be finite numbers "
                "(no nan or inf): pass the data set's per-channel mean and std"
            )
        if any(s <= 0 for s in std):
            raise CareError(f"augment: std {list(std)} must be positive")
        kernel = default_blur_kernel(output_size) if blur_kernel is None else blur_kernel
        if kernel < 1 or kernel % 2 == 0:
            raise CareError(f"augment: blur_kernel={kernel} must be a positive odd integer")
        self.recipe = recipe
        self.output_size = output_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.blur_kernel = kernel
        self._inv_std = tuple(1.0 / s for s in self.std)
        self._pixel_guard = PixelRangeGuard("augment: images")

    def __repr__(self) -> str:
        return (
            f"Augmenter(recipe={self.recipe!r}, output_size={self.output_size}, "
            f"mean={self.mean}, std={self.std}, blur_kernel={self.blur_kernel})"
        )

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        group_size: int = 1,
        pairs: str = "per_group",
    ) -> AugParams:
        """Parameters for ``n`` images: one record per group of ``group_size``, or per batch."""
        if pairs not in PAIRS_MODES:
            raise CareError(f"augment: pairs={pairs!r} must be one of {', '.join(PAIRS_MODES)}")
        if pairs == "per_batch":
            check_groups(n, group_size)  # a bad batch/group config fails in either mode
            return sample_params(n, self.recipe, generator, group_size=max(n, 1))
        return sample_params(n, self.recipe, generator, group_size)

    def apply(self, images: Tensor, params: AugParams) -> Tensor:
        """Apply ``params`` (one row per image) to ``images`` on the images' device.

        ``images`` are uint8 in 0..255 or float in [0, 1] (checked as the class says); an empty
        batch gives an empty batch of views.
        """
        if images.dim() != 4:
            raise CareError(
                f"augment: images must be (B, C, H, W), got shape {tuple(images.shape)}"
            )
        bsz, ch, height, width = images.shape
        if height == 0 or width == 0:
            raise CareError(
                f"augment: images of shape {tuple(images.shape)} have no pixels: "
                "pass images of at least 1x1 pixels (check the data set's image sizes)"
            )
        if ch != len(self.mean):
            raise CareError(
                f"augment: images have {ch} channels but mean/std have {len(self.mean)} values"
            )
        if len(params) != bsz:
            raise CareError(f"augment: {len(params)} parameter rows for {bsz} images")
        if bsz > 0:  # an empty batch would use up the one check on an accelerator
            self._pixel_guard(images)
        with autocast_off(images.device):
            return self._apply(images, params)

    def _apply(self, images: Tensor, params: AugParams) -> Tensor:
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div_(255.0)
        elif images.is_floating_point():
            x = images.to(torch.float32)
        else:
            raise CareError(f"augment: images must be uint8 or float, got {images.dtype}")
        device = x.device
        p = params.to(device)
        recipe, ch = self.recipe, x.shape[1]

        x = ops.resized_crop(x, p.crop, self.output_size, flip=p.flip)

        # Ops the recipe never samples are skipped (a static decision, no look at the values).
        rgb = ch == 3
        blend = recipe.brightness > 0 or recipe.contrast > 0 or (rgb and recipe.saturation > 0)
        hue = rgb and recipe.hue > 0
        if recipe.jitter_p > 0 and (blend or hue):
            jit = p.jitter
            one = torch.ones_like(p.brightness)
            x = ops.color_jitter(
                x,
                torch.where(jit, p.brightness, one),
                torch.where(jit, p.contrast, one),
                torch.where(jit, p.saturation, one),
                torch.where(jit, p.hue, 0.0),
                p.jitter_order,
                use_blend=blend,
                use_mean=recipe.contrast > 0,
                use_hue=hue,
            )

        if recipe.blur_p > 0:
            x = ops.gaussian_blur(x, p.blur_sigma, self.blur_kernel)

        # Grayscale goes with the normalisation, after the blur: the blur treats every channel
        # alike, so it commutes with taking the luma.
        gray = p.grayscale if rgb and recipe.grayscale_p > 0 else None
        return ops.normalize(x, self.mean, self._inv_std, gray)

    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator,
        group_size: int = 1,
        pairs: str = "per_group",
    ) -> tuple[Tensor, AugParams]:
        """Sample parameters for ``images`` and apply them; returns ``(views, params)``."""
        params = self.sample(images.shape[0], generator, group_size, pairs)
        return self.apply(images, params), params


def build_augmenter(cfg: Config, info: DataInfo) -> Augmenter:
    """SimCLR's augmentation for ``cfg``'s data: the recipe for its channels, crops of at least
    ``crop_min_scale`` of the area, output ``info.image_size``, normalised by its mean and std."""
    recipe = AugmentRecipe.for_channels(info.channels, crop_scale=(cfg.crop_min_scale, 1.0))
    return Augmenter(recipe, info.image_size, info.mean, info.std)
