"""A trained encoder as one module: images as the dataset stores them → embeddings.

:class:`EncoderSpec` is everything needed to rebuild a run's encoder without its config: the
architecture, the embedding geometry and the evaluation transform of its data. It travels as
string metadata in the run's safetensors files (:meth:`EncoderSpec.to_metadata`).
:class:`TrainedEncoder` is :class:`Preprocess` (the evaluation transform of
:func:`care.augment.eval.eval_transform`, with mean and std as buffers so that it moves with
``.to(device)`` and exports with :func:`torch.export.export`) followed by the backbone, or by the
whole :class:`~care.models.Encoder` for the projection layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata

import torch
from torch import Tensor, nn
from torch.nn import functional

from care.augment import PixelRangeGuard
from care.config import Config
from care.data import DataInfo
from care.errors import CareError
from care.models.encoder import Encoder
from care.models.heads import EMBEDDINGS, ProjectionHead
from care.models.resnet import ARCHITECTURES, STEMS, ResNet

ENCODER_FORMAT = "care-encoder/1"
"""The ``format`` metadata value of weights files this version writes and reads."""

ENCODER_LAYERS = ("backbone", "projection")
"""``backbone``: the features a linear probe uses; ``projection``: the head's output on the run's
sphere or hyperboloid."""

IN_CHANNELS = (1, 3)
"""The image channels a care encoder takes: grayscale or RGB."""

MAX_WIDTH = 16384
"""The widest stage width weights metadata may name (the standard ResNet's widest is 512)."""

MAX_HEAD_SIZE = 65536
"""The largest ``head_hidden`` and ``head_out`` weights metadata may name."""

MAX_IMAGE_SIZE = 8192
"""The largest ``input_size`` and ``image_size`` (pixels a side) weights metadata may name."""


def care_version() -> str:
    """The installed care's version (``unknown`` when care runs from an uninstalled tree)."""
    try:
        return package_metadata.version("care")
    except package_metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class EncoderSpec:
    """What rebuilds a trained encoder: architecture, embedding geometry, input and transform.

    ``input_size`` is the side of the images as the dataset stores them (28 for Fashion-MNIST,
    ``load_size`` for image folders); the evaluation transform crops their central
    ``eval_crop_fraction``, resizes to ``image_size`` if needed and normalises with ``mean`` and
    ``std``.
    """

    backbone: str
    stem: str
    widths: tuple[int, ...]
    in_channels: int
    head_hidden: int
    head_out: int
    embedding: str
    curvature: float
    dataset: str
    input_size: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_crop_fraction: float = 1.0

    def to_metadata(self, layer: str) -> dict[str, str]:
        """String metadata for a weights file of ``layer``: strings as they are, numbers and
        lists as JSON, plus ``format``, ``care_version`` and ``layer``."""
        values: dict[str, object] = {
            "format": ENCODER_FORMAT,
            "care_version": care_version(),
            "layer": layer,
            "backbone": self.backbone,
            "stem": self.stem,
            "widths": list(self.widths),
            "in_channels": self.in_channels,
            "head_hidden": self.head_hidden,
            "head_out": self.head_out,
            "embedding": self.embedding,
            "curvature": self.curvature,
            "dataset": self.dataset,
            "input_size": self.input_size,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "eval_crop_fraction": self.eval_crop_fraction,
        }
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> EncoderSpec:
        """The spec in weights metadata (:meth:`to_metadata`), every value checked
        (:meth:`check`); a missing, damaged or impossible value is a one-line ``ValueError``
        naming the key (the caller names the file)."""
        fmt = metadata.get("format")
        if fmt != ENCODER_FORMAT:
            raise ValueError(
                f"format {_shown(fmt)} is not {ENCODER_FORMAT!r}: written by another version of "
                "care"
            )

        def raw(key: str) -> str:
            if key not in metadata:
                raise ValueError(f"no '{key}' in its metadata")
            return metadata[key]

        def value(key: str) -> object:
            text = raw(key)
            try:
                return json.loads(text)
            except (ValueError, RecursionError):  # JSONDecodeError, or too many digits
                raise ValueError(f"'{key}' is not JSON: {_shown(text)}") from None

        def whole(key: str, low: int, high: int) -> int:
            found = _as_int(value(key))
            if found is None or not low <= found <= high:
                raise ValueError(
                    f"'{key}' must be a whole number from {low} to {high}, got {_shown(raw(key))}"
                )
            return found

        def number(key: str) -> float:
            found = _as_float(value(key))
            if found is None:
                raise ValueError(f"'{key}' must be a finite number, got {_shown(raw(key))}")
            return found

        def numbers(key: str) -> tuple[float, ...]:
            found = value(key)
            items = [_as_float(v) for v in found] if isinstance(found, list) else [None]
            if any(v is None for v in items):
                raise ValueError(
                    f"'{key}' must be a list of finite numbers, got {_shown(raw(key))}"
                )
            return tuple(v for v in items if v is not None)

        def text(key: str) -> str:
            return raw(key)

        found_widths = value("widths")
        widths = [_as_int(w) for w in found_widths] if isinstance(found_widths, list) else []
        if len(widths) != 4 or not all(w is not None and 1 <= w <= MAX_WIDTH for w in widths):
            raise ValueError(
                f"'widths' must be 4 whole numbers from 1 to {MAX_WIDTH}, got "
                f"{_shown(raw('widths'))}"
            )
        spec = cls(
            backbone=text("backbone"),
            stem=text("stem"),
            widths=tuple(w for w in widths if w is not None),
            in_channels=whole("in_channels", 1, 3),
            head_hidden=whole("head_hidden", 1, MAX_HEAD_SIZE),
            head_out=whole("head_out", 1, MAX_HEAD_SIZE),
            embedding=text("embedding"),
            curvature=number("curvature"),
            dataset=text("dataset"),
            input_size=whole("input_size", 1, MAX_IMAGE_SIZE),
            image_size=whole("image_size", 1, MAX_IMAGE_SIZE),
            mean=numbers("mean"),
            std=numbers("std"),
            eval_crop_fraction=number("eval_crop_fraction"),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Raise a one-line ``ValueError`` naming the first value of this spec that no care
        encoder has: an unknown backbone, stem or embedding, other than 1 or 3 channels, sizes
        that are not positive or beyond the ``MAX_*`` bounds, a mean and std that are not one
        finite value per channel (std positive), a curvature that is not positive and finite,
        an ``eval_crop_fraction`` outside (0, 1]."""
        choices: tuple[tuple[str, object, Sequence[object]], ...] = (
            ("backbone", self.backbone, sorted(ARCHITECTURES)),
            ("stem", self.stem, STEMS),
            ("embedding", self.embedding, EMBEDDINGS),
            ("in_channels", self.in_channels, IN_CHANNELS),
        )
        for key, found, allowed in choices:
            if found not in allowed:
                raise ValueError(f"'{key}' must be one of {list(allowed)}, got {_shown(found)}")
        if len(self.widths) != 4 or not all(
            (w := _as_int(width)) is not None and 1 <= w <= MAX_WIDTH for width in self.widths
        ):
            raise ValueError(
                f"'widths' must be 4 whole numbers from 1 to {MAX_WIDTH}, got "
                f"{_shown(list(self.widths))}"
            )
        sizes = (
            ("head_hidden", self.head_hidden, MAX_HEAD_SIZE),
            ("head_out", self.head_out, MAX_HEAD_SIZE),
            ("input_size", self.input_size, MAX_IMAGE_SIZE),
            ("image_size", self.image_size, MAX_IMAGE_SIZE),
        )
        for key, size, high in sizes:
            whole = _as_int(size)
            if whole is None or not 1 <= whole <= high:
                raise ValueError(
                    f"'{key}' must be a whole number from 1 to {high}, got {_shown(size)}"
                )
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.in_channels or any(_as_float(v) is None for v in values):
                raise ValueError(
                    f"'{key}' must hold one finite number per channel ({self.in_channels}), "
                    f"got {_shown(list(values))}"
                )
        if not all(s > 0 for s in self.std):
            raise ValueError(
                f"'std' must be positive (images are divided by it), got {_shown(list(self.std))}"
            )
        curvature = _as_float(self.curvature)
        if curvature is None or curvature <= 0:
            raise ValueError(
                f"'curvature' must be a positive finite number, got {_shown(self.curvature)}"
            )
        crop = _as_float(self.eval_crop_fraction)
        if crop is None or not 0 < crop <= 1:
            raise ValueError(
                f"'eval_crop_fraction' must lie in (0, 1], got {_shown(self.eval_crop_fraction)}"
            )
        if round(self.input_size * crop) < 1:
            raise ValueError(
                f"'eval_crop_fraction' {crop} of {self.input_size}-pixel images keeps no pixel"
            )
        if not isinstance(self.dataset, str):
            raise ValueError(f"'dataset' must be a name, got {_shown(self.dataset)}")

    def architecture(self) -> dict[str, object]:
        """What decides the model's weights and outputs: backbone, stem, widths, head sizes,
        embedding and curvature (not the data or its transform)."""
        return {
            "backbone": self.backbone,
            "stem": self.stem,
            "widths": list(self.widths),
            "head_hidden": self.head_hidden,
            "head_out": self.head_out,
            "embedding": self.embedding,
            "curvature": self.curvature,
        }


def _as_int(value: object) -> int | None:
    """``value`` if it is a whole number (an int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a finite number (an int or a float, not a bool), else
    None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _shown(value: object, limit: int = 40) -> str:
    """``value`` as a message shows it: its repr on one line, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encoder_spec(cfg: Config, info: DataInfo, input_size: int) -> EncoderSpec:
    """The spec of the encoder ``cfg`` trains on data described by ``info``, whose images are
    stored ``input_size`` pixels wide."""
    return EncoderSpec(
        backbone=cfg.backbone,
        stem=cfg.stem,
        widths=tuple(int(w) for w in cfg.widths),
        in_channels=info.channels,
        head_hidden=cfg.head_hidden,
        head_out=cfg.head_out,
        embedding=cfg.embedding,
        curvature=float(cfg.curvature),
        dataset=cfg.dataset,
        input_size=int(input_size),
        image_size=info.image_size,
        mean=tuple(info.mean),
        std=tuple(info.std),
        eval_crop_fraction=info.eval_crop_fraction,
    )


class Preprocess(nn.Module):
    """The evaluation transform as a module: uint8 (0..255) or float ([0, 1]) ``(N, C, H, W)``
    → the central ``crop_fraction``, resized to ``image_size`` if needed, normalised.

    It computes what :func:`care.augment.eval.eval_transform` computes, number for number. Float
    images clearly outside [0, 1] (0..255 values cast to float, images already normalised) are
    refused in one line (:class:`care.augment.PixelRangeGuard`: every float batch on the CPU,
    the first one on an accelerator); the check is left out while the module is traced, compiled
    or exported.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.crop_fraction = float(crop_fraction)
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), False)
        self.pixel_range = PixelRangeGuard("the encoder's images")

    def forward(self, images: Tensor) -> Tensor:
        if images.is_floating_point() and not _tracing():
            self.pixel_range(images)  # 0..255 as float: refused (once per guard on a GPU)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        h, w = x.shape[-2:]
        if self.crop_fraction < 1.0:
            ch, cw = round(h * self.crop_fraction), round(w * self.crop_fraction)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std


def _tracing() -> bool:
    """Whether the module is being traced (:func:`torch.export.export`, :func:`torch.compile`,
    :func:`torch.jit.trace`): its inputs hold no values to check, and a check would not trace."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class TrainedEncoder(nn.Module):
    """Images as stored → embeddings: :class:`Preprocess`, then the backbone (``layer=
    "backbone"``) or the backbone, head and map onto the sphere or hyperboloid
    (``"projection"``). Built untrained from ``spec``; load the weights into :attr:`backbone`
    and :attr:`head`."""

    def __init__(self, spec: EncoderSpec, layer: str = "backbone") -> None:
        super().__init__()
        if layer not in ENCODER_LAYERS:
            raise CareError(f"unknown layer {layer!r}: choose one of {list(ENCODER_LAYERS)}")
        self.spec, self.layer = spec, layer
        self.preprocess = Preprocess(spec.image_size, spec.mean, spec.std, spec.eval_crop_fraction)
        backbone = ResNet(
            spec.backbone, in_channels=spec.in_channels, stem=spec.stem, widths=spec.widths
        )
        self.net: nn.Module = backbone
        if layer == "projection":
            head = ProjectionHead(backbone.feature_dim, spec.head_hidden, spec.head_out)
            self.net = Encoder(backbone, head, spec.embedding, spec.curvature)

    @property
    def backbone(self) -> ResNet:
        net = self.net
        return net.backbone if isinstance(net, Encoder) else net  # type: ignore[return-value]

    @property
    def head(self) -> ProjectionHead | None:
        """The projection head (None for the backbone layer)."""
        return self.net.head if isinstance(self.net, Encoder) else None

    @property
    def dim(self) -> int:
        """The embedding size: backbone features, or ``head_out`` (+1 on the hyperboloid)."""
        if self.layer == "backbone":
            return self.backbone.feature_dim
        return self.spec.head_out + (1 if self.spec.embedding == "hyperboloid" else 0)

    def forward(self, images: Tensor) -> Tensor:
        channels = self.spec.in_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise CareError(
                f"the encoder takes (N, {channels}, H, W) images, got {tuple(images.shape)}: "
                f"pass a batch of {channels}-channel images"
            )
        return self.net(self.preprocess(images))
