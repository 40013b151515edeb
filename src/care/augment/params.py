"""Augmentation recipes, typed parameter records, and parameter sampling.

Sampling is split from applying (EquiMod style): :func:`sample_params` draws a record of
parameters for each image, and :mod:`care.augment.ops` applies them. CARE needs this split
because a whole group of ``m`` consecutive images must share one augmentation ``a_g``
(paper, Algorithm 1; design notes, "Group-shared augmentation"), and evaluation wants to know
which augmentation produced which embedding.

All draws happen on the CPU from an explicit :class:`torch.Generator`, as one uniform matrix of
fixed shape per call, so one seed always gives the same records.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from care.errors import CareError

__all__ = ["AugParams", "AugmentRecipe", "check_groups", "sample_params"]

#: How many candidate boxes the crop sampler tries per record (torchvision uses 10).
CROP_ATTEMPTS = 10


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise CareError(
            f"augment recipe: {name}={value!r} must be an interval (lo, hi) with "
            f"{low} <= lo <= hi <= {high}"
        )


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise CareError(f"augment recipe: {name}={value!r} must be a probability in [0, 1]")


@dataclass(frozen=True)
class AugmentRecipe:
    """The distribution of augmentations; the defaults are SimCLR's (Chen et al., 2020).

    ``crop_scale`` is the area fraction of the crop, ``crop_ratio`` its aspect ratio (width /
    height); ``brightness``/``contrast``/``saturation`` give factors in ``[max(0, 1-s), 1+s]`` and
    ``hue`` a shift in ``[-hue, hue]`` turns, as in torchvision's ``ColorJitter``.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but store tuples so the recipe stays hashable.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            if not isinstance(value, Sequence) or len(value) != 2:
                raise CareError(f"augment recipe: {name}={value!r} must be a pair (lo, hi)")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[1] <= 0.0:
            raise CareError(f"augment recipe: crop_scale={self.crop_scale!r} must allow area > 0")
        _check_range("crop_ratio", self.crop_ratio, 1e-6, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        if self.blur_p > 0 and self.blur_sigma[0] <= 0.0:
            raise CareError(
                f"augment recipe: blur_sigma={self.blur_sigma!r} must be > 0 when blur_p > 0"
            )
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            _check_prob(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise CareError(f"augment recipe: {name}={getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise CareError(f"augment recipe: hue={self.hue!r} must be in [0, 0.5]")

    @classmethod
    def for_channels(cls, channels: int, **overrides: Any) -> AugmentRecipe:
        """SimCLR's recipe adapted to ``channels`` (1 or 3), then ``overrides`` applied.

        For 1-channel images (MNIST-like) saturation, hue and grayscale have no meaning, so
        they are switched off; brightness, contrast, crop, flip and blur stay.
        """
        if channels not in (1, 3):
            raise CareError(f"augment recipe: channels={channels!r} must be 1 or 3")
        recipe = cls()
        if channels == 1:
            recipe = replace(recipe, saturation=0.0, hue=0.0, grayscale_p=0.0)
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise CareError(f"augment recipe: unknown field(s) {', '.join(unknown)}")
        return replace(recipe, **overrides)


@dataclass
class AugParams:
    """Sampled augmentation parameters, one row per image (all tensors lead with ``B``).

    ``crop`` holds ``(top, left, height, width)`` as fractions of the image side; ``hue`` is a
    shift in turns; the other factors are 1.0 for identity; ``blur_sigma`` is 0 for no blur.
    ``jitter_order[b]`` is a permutation of (0=brightness, 1=contrast, 2=saturation, 3=hue):
    ``jitter_order[b, k]`` is the op applied in slot ``k``.
    """

    crop: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur_sigma: Tensor

    #: ``(field, columns, dtype)`` in the order of :meth:`pack`'s columns.
    PACKED: ClassVar[tuple[tuple[str, int, torch.dtype], ...]] = (
        ("crop", 4, torch.float32),
        ("flip", 1, torch.bool),
        ("jitter", 1, torch.bool),
        ("brightness", 1, torch.float32),
        ("contrast", 1, torch.float32),
        ("saturation", 1, torch.float32),
        ("hue", 1, torch.float32),
        ("jitter_order", 4, torch.int64),
        ("grayscale", 1, torch.bool),
        ("blur_sigma", 1, torch.float32),
    )

    FEATURE_NAMES: ClassVar[tuple[str, ...]] = (
        "crop_scale",
        "crop_aspect",
        "crop_center_y",
        "crop_center_x",
        "flip",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale",
        "blur_sigma",
    )

    def __post_init__(self) -> None:
        n = self.crop.shape[0]
        if self.crop.shape != (n, 4) or self.jitter_order.shape != (n, 4):
            raise CareError("AugParams: crop and jitter_order must have shape (B, 4)")
        for f in fields(self):
            if getattr(self, f.name).shape[0] != n:
                raise CareError(f"AugParams: field {f.name} has a different batch size than crop")

    def __len__(self) -> int:
        return int(self.crop.shape[0])

    def as_dict(self) -> dict[str, Tensor]:
        """The fields as a ``{name: tensor}`` dict (e.g. for saving with safetensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def rows(self, index: slice) -> AugParams:
        """The records of rows ``index`` (views of these tensors), e.g. to apply one record for
        ``n`` images to them a batch at a time."""
        return AugParams(**{name: value[index] for name, value in self.as_dict().items()})

    def pack(self) -> Tensor:
        """All fields as one ``(B, 16)`` tensor (columns as in ``PACKED``), on this device.

        float32, which holds the bools and the small ints exactly; float64 if any field is
        float64. :meth:`unpack` inverts it.
        """
        values = self.as_dict()
        wide = any(values[name].dtype == torch.float64 for name, _, _ in self.PACKED)
        dtype = torch.float64 if wide else torch.float32
        # (B, cols), not (B, -1): an empty record (B = 0) has no -1 to infer.
        columns = [values[name].to(dtype).reshape(len(self), cols) for name, cols, _ in self.PACKED]
        return torch.cat(columns, dim=1)

    @classmethod
    def unpack(cls, packed: Tensor) -> AugParams:
        """The record of a :meth:`pack` ed tensor, on its device: bools, int64 and floats (of the
        packed dtype) again, with no host sync."""
        width = sum(cols for _, cols, _ in cls.PACKED)
        if packed.dim() != 2 or packed.shape[1] != width:
            raise CareError(
                f"AugParams.unpack: expected shape (B, {width}), got {tuple(packed.shape)}"
            )
        values: dict[str, Tensor] = {}
        start = 0
        for name, cols, kind in cls.PACKED:
            block = packed[:, start : start + cols] if cols > 1 else packed[:, start]
            start += cols
            if kind == torch.bool:
                values[name] = block != 0
            elif kind == torch.int64:
                values[name] = block.to(torch.int64)
            else:
                values[name] = block.contiguous()
        return cls(**values)

    def to(self, device: torch.device | str) -> AugParams:
        """The record on ``device``: itself if it is there, else one packed copy.

        A CPU record bound for CUDA is packed into pinned memory and copied with
        ``non_blocking=True``, so the host does not wait for the device.
        """
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if all(v.device == target for v in self.as_dict().values()):
            return self
        packed = self.pack()
        pinned = packed.device.type == "cpu" and target.type == "cuda" and torch.cuda.is_available()
        if pinned:
            packed = packed.pin_memory()
        return AugParams.unpack(packed.to(target, non_blocking=pinned))

    @property
    def device(self) -> torch.device:
        return self.crop.device

    def features(self) -> Tensor:
        """``(B, 11)`` float32 matrix of scalar parameters, columns as in ``FEATURE_NAMES``.

        Meant for regression probes ("which augmentation gave which rotation"); the crop is
        summarised by its area fraction, aspect ratio (width / height) and centre.
        """
        top, left, h, w = self.crop.float().unbind(1)
        cols = [
            h * w,
            w / h,
            top + h / 2,
            left + w / 2,
            self.flip.float(),
            self.brightness.float(),
            self.contrast.float(),
            self.saturation.float(),
            self.hue.float(),
            self.grayscale.float(),
            self.blur_sigma.float(),
        ]
        return torch.stack(cols, dim=1)


# Columns of the one uniform draw per record (see sample_params).
_AREA = slice(0, CROP_ATTEMPTS)
_LOG_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_POS = slice(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 2)
_FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE = range(2 * CROP_ATTEMPTS + 2, 2 * CROP_ATTEMPTS + 8)
_ORDER = slice(2 * CROP_ATTEMPTS + 8, 2 * CROP_ATTEMPTS + 12)
_GRAY, _BLUR, _SIGMA = range(2 * CROP_ATTEMPTS + 12, 2 * CROP_ATTEMPTS + 15)
_COLUMNS = 2 * CROP_ATTEMPTS + 15


@functools.lru_cache(maxsize=32)
def _column_ranges(recipe: AugmentRecipe) -> tuple[Tensor, Tensor]:
    """Per-column ``(low, high)`` that map the U(0, 1) draw onto each parameter's range."""
    low = [0.0] * _COLUMNS
    high = [1.0] * _COLUMNS
    for col in range(_AREA.start, _AREA.stop):
        low[col], high[col] = recipe.crop_scale
    for col in range(_LOG_RATIO.start, _LOG_RATIO.stop):
        low[col], high[col] = (math.log(r) for r in recipe.crop_ratio)
    for col, strength in (
        (_BRIGHT, recipe.brightness),
        (_CONTRAST, recipe.contrast),
        (_SAT, recipe.saturation),
    ):
        low[col], high[col] = max(0.0, 1.0 - strength), 1.0 + strength
    low[_HUE], high[_HUE] = -recipe.hue, recipe.hue
    low[_SIGMA], high[_SIGMA] = recipe.blur_sigma
    return torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64)


def _crop_boxes(area: Tensor, log_ratio: Tensor, pos: Tensor, recipe: AugmentRecipe) -> Tensor:
    """torchvision ``RandomResizedCrop.get_params``, vectorised over records, in fractions.

    ``area``/``log_ratio`` hold the ``CROP_ATTEMPTS`` candidates per record; the first that fits
    wins, else torchvision's fallback (the whole image, or a centred box clamped to the ratio
    bounds). Boxes are fractions of the image side, so the aspect ratio is exact for square
    images (every data set CARE uses) and any image size works.
    """
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt()
    h = (area / ratio).sqrt()
    fits = (w > 0) & (w <= 1) & (h > 0) & (h <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (or 0)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    r_lo, r_hi = recipe.crop_ratio
    if r_lo > 1.0:  # the image (ratio 1) is too tall: keep the width
        fb_w, fb_h = 1.0, 1.0 / r_lo
    elif r_hi < 1.0:  # the image is too wide: keep the height
        fb_w, fb_h = r_hi, 1.0
    else:
        fb_w, fb_h = 1.0, 1.0
    w = torch.where(found, w, torch.full_like(w, fb_w))
    h = torch.where(found, h, torch.full_like(h, fb_h))
    top = torch.where(found, pos[:, 0] * (1 - h), (1 - h) / 2)
    left = torch.where(found, pos[:, 1] * (1 - w), (1 - w) / 2)
    return torch.stack([top, left, h, w], dim=1).float()


def check_groups(n: int, group_size: int) -> None:
    """Raise :class:`CareError` unless ``n`` images split into whole groups of ``group_size``,
    an int >= 1 (a bool or a float such as ``16.0`` is refused, not truncated)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise CareError(
            f"group_size={group_size!r} must be an int, not {type(group_size).__name__}: "
            "pass a whole number such as group_size=16"
        )
    if group_size < 1:
        raise CareError(f"group_size={group_size} must be >= 1")
    if n % group_size != 0:
        raise CareError(
            f"batch of {n} images does not split into groups of {group_size}: "
            "choose batch_size divisible by group_size"
        )


def sample_params(
    n: int, recipe: AugmentRecipe, generator: torch.Generator, group_size: int = 1
) -> AugParams:
    """Draw parameters for ``n`` images, one independent record per group of ``group_size``.

    ``n // group_size`` records are drawn on the CPU from ``generator`` and each is repeated
    ``group_size`` times, so images ``g*m .. g*m+m-1`` share record ``g`` (design notes,
    "Group-shared augmentation"). The same generator state always gives the same records.
    """
    check_groups(n, group_size)
    if generator.device.type != "cpu":
        raise CareError("sample_params: pass a CPU torch.Generator (parameters are drawn on CPU)")
    g = n // group_size
    # One (g, 35) uniform draw per call, mapped column-wise onto each parameter's range.
    u = torch.rand(g, _COLUMNS, generator=generator, dtype=torch.float64)
    low, high = _column_ranges(recipe)
    v = torch.addcmul(low, u, high - low)
    crop = _crop_boxes(v[:, _AREA], v[:, _LOG_RATIO], v[:, _POS], recipe)
    flip = u[:, _FLIP] < recipe.flip_p
    jitter = u[:, _JITTER] < recipe.jitter_p
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    factors = torch.where(jitter[:, None], v[:, _BRIGHT : _HUE + 1], identity).float()
    order = torch.argsort(u[:, _ORDER], dim=1)
    grayscale = u[:, _GRAY] < recipe.grayscale_p
    blur = u[:, _BLUR] < recipe.blur_p
    sigma = torch.where(blur, v[:, _SIGMA], torch.zeros_like(v[:, _SIGMA])).float()

    record = AugParams(
        crop=crop,
        flip=flip,
        jitter=jitter,
        brightness=factors[:, 0].contiguous(),
        contrast=factors[:, 1].contiguous(),
        saturation=factors[:, 2].contiguous(),
        hue=factors[:, 3].contiguous(),
        jitter_order=order,
        grayscale=grayscale,
        blur_sigma=sigma,
    )
    if group_size == 1:
        return record
    return AugParams(
        **{k: t.repeat_interleave(group_size, dim=0) for k, t in record.as_dict().items()}
    )
