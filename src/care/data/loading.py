"""From a config to batches: the splits it names, what a model needs to know of them, the sampler.

:func:`load_split` reads one split of ``cfg.dataset``; :func:`data_info` says what the augmenter,
the encoder and the evaluations need to know about it (:class:`DataInfo`); :class:`EpochSampler`
orders the pretraining images reproducibly per epoch and shards them by rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from care.config import Config
from care.data.base import LabeledImages
from care.data.registry import get_spec, load_dataset

DEFAULT_IMAGE_SIZE = 224
"""Crop size of datasets without a native size (image folders), unless ``image_size`` says."""


@dataclass(frozen=True)
class DataInfo:
    """What the augmenter, the encoder and the evaluations need to know about the data."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    eval_crop_fraction: float = 1.0


def load_split(cfg: Config, split: str) -> LabeledImages:
    """The ``pretrain``, ``train`` or ``test`` split of ``cfg.dataset`` (all of its images)."""
    return load_dataset(
        cfg.dataset, cfg.data_root, split, load_size=cfg.load_size, class_list=cfg.class_list
    )


def data_info(cfg: Config, dataset: LabeledImages) -> DataInfo:
    """Channels, output size and normalisation of a dataset under this config.

    The output size is ``image_size``, else the dataset's native size (224 for image folders).
    Image folders are evaluated on their central ``size / load_size`` crop, as ImageNet is.
    """
    spec = get_spec(cfg.dataset)
    size = cfg.image_size or spec.image_size or DEFAULT_IMAGE_SIZE
    stored = dataset.image_shape[-1]
    crop = min(1.0, size / stored) if spec.image_size is None else 1.0
    return DataInfo(
        channels=dataset.channels,
        image_size=size,
        mean=tuple(dataset.mean),
        std=tuple(dataset.std),
        num_classes=dataset.num_classes,
        eval_crop_fraction=crop,
    )


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), and shards by rank.

    Lightning calls :meth:`set_epoch` each epoch, so a resumed run sees the same order as an
    uninterrupted one. Every rank gets ``len // world_size`` indices (the tail is dropped).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)[: len(self) * self.world_size]
        return iter(order[self.rank :: self.world_size].tolist())


def make_loader(
    dataset: LabeledImages, cfg: Config, sampler: Sampler[int] | None = None
) -> DataLoader:
    """Batches of ``cfg.batch_size``: in ``sampler``'s order without a short last batch (for
    training), or all images in order (for evaluation) when no sampler is given."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
