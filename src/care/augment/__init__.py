"""Batched tensor augmentation with parameter sampling split from applying.

``sample_params``/``Augmenter.sample`` draw typed :class:`AugParams` records (one per image, or
one shared by each group of ``m`` consecutive images, as CARE's ``L_equi`` needs); ``ops`` holds
the vectorised kernels and :class:`Augmenter` chains them in SimCLR's order on any device.
"""

from __future__ import annotations

from care.augment import ops
from care.augment.eval import PixelRangeGuard, check_pixel_range
from care.augment.memory import tune_malloc
from care.augment.params import AugmentRecipe, AugParams, check_groups, sample_params
from care.augment.pipeline import PAIRS_MODES, Augmenter, build_augmenter, default_blur_kernel

__all__ = [
    "PAIRS_MODES",
    "AugParams",
    "AugmentRecipe",
    "Augmenter",
    "PixelRangeGuard",
    "build_augmenter",
    "check_groups",
    "check_pixel_range",
    "default_blur_kernel",
    "ops",
    "sample_params",
    "tune_malloc",
]
