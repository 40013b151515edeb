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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata

import torch
from torch import Tensor, nn
from torch.nn import functional

from care.config import Config
from care.data import DataInfo
from care.errors import CareError
from care.models.encoder import Encoder
from care.models.heads import ProjectionHead
from care.models.resnet import ResNet

ENCODER_FORMAT = "care-encoder/1"
"""The ``format`` metadata value of weights files this version writes and reads."""

ENCODER_LAYERS = ("backbone", "projection")
"""``backbone``: the features a linear probe uses; ``projection``: the head's output on the run's
sphere or hyperboloid."""


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
        """The spec in weights metadata (:meth:`to_metadata`); a missing or damaged value is a
        ``ValueError`` naming the key (the caller names the file)."""
        fmt = metadata.get("format")
        if fmt != ENCODER_FORMAT:
            raise ValueError(
                f"format {fmt!r} is not {ENCODER_FORMAT!r}: written by another version of care"
            )

        def value(key: str) -> object:
            if key not in metadata:
                raise ValueError(f"no '{key}' in its metadata")
            try:
                return json.loads(metadata[key])
            except json.JSONDecodeError:
                raise ValueError(f"'{key}' is not JSON: {metadata[key][:40]!r}") from None

        def text(key: str) -> str:
            if key not in metadata:
                raise ValueError(f"no '{key}' in its metadata")
            return metadata[key]

        try:
            return cls(
                backbone=text("backbone"),
                stem=text("stem"),
                widths=tuple(int(w) for w in value("widths")),  # type: ignore[attr-defined]
                in_channels=int(value("in_channels")),  # type: ignore[call-overload]
                head_hidden=int(value("head_hidden")),  # type: ignore[call-overload]
                head_out=int(value("head_out")),  # type: ignore[call-overload]
                embedding=text("embedding"),
                curvature=float(value("curvature")),  # type: ignore[arg-type]
                dataset=text("dataset"),
                input_size=int(value("input_size")),  # type: ignore[call-overload]
                image_size=int(value("image_size")),  # type: ignore[call-overload]
                mean=tuple(float(m) for m in value("mean")),  # type: ignore[attr-defined]
                std=tuple(float(s) for s in value("std")),  # type: ignore[attr-defined]
                eval_crop_fraction=float(value("eval_crop_fraction")),  # type: ignore[arg-type]
            )
        except TypeError as exc:
            raise ValueError(f"a value has the wrong type ({exc})") from None


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

    It computes what :func:`care.augment.eval.eval_transform` computes, number for number.
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

    def forward(self, images: Tensor) -> Tensor:
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
