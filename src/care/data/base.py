"""Dataset base classes: labelled uint8 images, and the registry's dataset description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from care.errors import CareError

UNLABELED = -1
"""Label of an image without a class (STL-10's unlabeled split)."""


class LabeledImages(Dataset[tuple[torch.Tensor, int]]):
    """A dataset of uint8 images ``(C, H, W)`` with integer labels (``-1`` = unlabeled).

    Subclasses implement ``__len__``, ``__getitem__``, ``image_shape`` and ``_take``.
    """

    name: str
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        *,
        name: str,
        channels: int,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if len(mean) != channels or len(std) != channels:
            raise CareError(
                f"dataset {name!r}: mean/std have {len(mean)}/{len(std)} values for {channels} "
                "channels; give one value per channel"
            )
        self.name = name
        self.channels = channels
        self.num_classes = num_classes
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        raise NotImplementedError

    def subset(self, n: int) -> LabeledImages:
        """The first ``n`` items (e.g. ``train_samples``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > len(self):
            raise CareError(
                f"dataset {self.name!r}: cannot take the first {n!r} of {len(self)} images; "
                f"use a number of samples between 1 and {len(self)}"
            )
        return self._take(n)

    def _take(self, n: int) -> LabeledImages:
        """The first ``n`` items; ``n`` is already checked."""
        raise NotImplementedError

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape=({c}, {h}, {w}), "
            f"num_classes={self.num_classes})"
        )


class TensorImages(LabeledImages):
    """Images held in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise CareError(
                f"dataset {name!r}: images must be a uint8 (N, C, H, W) tensor, got "
                f"{images.dtype} {tuple(images.shape)}; convert them first"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise CareError(
                f"dataset {name!r}: labels must be an int64 ({images.shape[0]},) tensor, got "
                f"{labels.dtype} {tuple(labels.shape)}; give one label per image"
            )
        if labels.numel() and (int(labels.min()) < UNLABELED or int(labels.max()) >= num_classes):
            raise CareError(
                f"dataset {name!r}: labels span {int(labels.min())}..{int(labels.max())}, "
                f"outside -1..{num_classes - 1}; fix the labels or num_classes"
            )
        super().__init__(
            name=name, channels=int(images.shape[1]), num_classes=num_classes, mean=mean, std=std
        )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def _take(self, n: int) -> TensorImages:
        return TensorImages(
            self.images[:n],
            self.labels[:n],
            name=self.name,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class LoadOptions:
    """Options that only some datasets use (image folders)."""

    load_size: int = 256
    class_list: Path | None = None


Loader = Callable[["DatasetSpec", Path, str, LoadOptions], LabeledImages]
"""``loader(spec, root, split, options)`` reads one split of a dataset."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its fixed properties and how to read it."""

    name: str
    channels: int
    num_classes: int | None  # None: decided by the data (image folders)
    image_size: int | None  # None: decided by ``load_size`` (image folders)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Loader
    download_hint: str
