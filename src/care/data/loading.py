"""From a config to batches: the splits it names, what a model needs to know of them, the sampler.

:func:`load_split` reads one split of ``cfg.dataset``; :func:`data_info` says what the augmenter,
the encoder and the evaluations need to know about it (:class:`DataInfo`); :class:`EpochSampler`
orders the pretraining images reproducibly per epoch and shards them by rank, and
:class:`ResumableLoader` batches them so that a checkpoint records the position within an epoch.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from care.config import Config
from care.data import folder
from care.data.base import LabeledImages
from care.data.folder import resolve_class_list
from care.data.registry import get_spec, load_dataset, resolve_data_root

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


#: The largest crop an image folder gets without ``image_size`` (ImageNet's), and the largest
#: side its images are decoded at without ``load_size`` (ImageNet's 256 for a 224 crop).
MAX_DERIVED_IMAGE_SIZE = 224
MAX_DERIVED_LOAD_SIZE = 256


@dataclass(frozen=True)
class ImageSizes:
    """The sizes an image folder is read at, and where they came from."""

    load_size: int
    image_size: int
    typical_side: int | None  # the median shorter side of the sampled images (None: not looked)
    root: str

    def describe(self) -> str:
        """The line a run starts with: what was chosen and how to choose otherwise."""
        seen = (
            f"images about {self.typical_side} px on their shorter side"
            if self.typical_side is not None
            else "sizes given"
        )
        return (
            f"image folder {self.root}: {seen}: decoding at load_size={self.load_size}, "
            f"training on crops of image_size={self.image_size} (set load_size= and image_size= "
            "to change them)"
        )


def folder_image_sizes(cfg: Config) -> ImageSizes:
    """``load_size`` and ``image_size`` for an image-folder run that leaves one unset, from its
    images (the median shorter side of up to 64 evenly spread files, read from their headers):

    - ``load_size``: that side, at most 256 (images are decoded, shorter side resized and
      centre-cropped to it);
    - ``image_size``: ``load_size``, at most 224 (so ImageNet-sized folders get ImageNet's
      256/224, and 64-pixel images train at 64 px instead of being blown up to 224).

    Values the config gives are kept.
    """
    root = resolve_data_root(cfg.dataset, cfg.data_root)
    typical: int | None = None
    load_size = cfg.load_size
    if load_size is None:
        class_list = None if cfg.class_list is None else resolve_class_list(cfg.class_list)
        typical = folder.typical_image_side(root, "pretrain", class_list)
        load_size = min(typical, MAX_DERIVED_LOAD_SIZE)
    image_size = cfg.image_size or min(load_size, MAX_DERIVED_IMAGE_SIZE)
    return ImageSizes(load_size, image_size, typical, str(root))


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
    :meth:`resume_at` makes the next pass over one epoch start part-way through it (a run
    resumed from a mid-epoch checkpoint).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, indices of it already used)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, used: int) -> None:
        """Skip the first ``used`` indices of this rank's order the next time ``epoch`` is
        iterated (once)."""
        self._resume = (epoch, used)

    def resume_offset(self) -> int:
        """How many indices the coming pass over the current epoch skips (:meth:`resume_at`)."""
        resuming = self._resume is not None and self._resume[0] == self.epoch
        return self._resume[1] if self._resume is not None and resuming else 0

    def __len__(self) -> int:
        return self.size // self.world_size

    def order(self) -> list[int]:
        """This rank's indices of the current epoch, in order."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)[: len(self) * self.world_size]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self._resume = self.resume_offset(), None  # a resume point is used once
        return iter(self.order()[skip:])


class ResumableLoader(DataLoader):
    """The training loader: batches in :class:`EpochSampler`'s order, whose position within the
    epoch goes into every checkpoint (Lightning saves ``state_dict`` with the loops), so that a
    run resumed from a mid-epoch checkpoint continues with the next batch of the same order.

    Iterating is lazy: the sampler (and the workers' first indices) start at the first batch,
    after Lightning has set the epoch, even when worker processes prefetch.
    """

    sampler: EpochSampler

    def __init__(self, dataset: LabeledImages, sampler: EpochSampler, **settings: Any) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **settings)
        self.served = 0  # batches of the current epoch handed out, those skipped on resume too

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.served = self.sampler.resume_offset() // int(self.batch_size or 1)
        for batch in super().__iter__():  # the sampler's pass starts here, skipping as resumed
            self.served += 1  # counted before the step runs: the checkpoint follows it
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.resume_at(
            int(state["epoch"]), int(state["batches"]) * int(self.batch_size or 1)
        )


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, padded by wrapping around so that
    every rank gets ``ceil(size / world_size)`` (evaluation on several processes: rank ``r``'s
    ``k``-th sample is image ``(r + k * world_size) % size``; see :func:`unshard`)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter([(self.rank + k * self.world_size) % self.size for k in range(len(self))])


def unshard(gathered: Tensor, size: int) -> Tensor:
    """Rows of every rank's :class:`ShardSampler` shard, ``(world_size, per_rank, ...)``, back in
    dataset order, padding dropped: ``(size, ...)``."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:size]


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT, SIGTERM and SIGUSR1 to the training process, which stops
    cleanly on them (a terminal's Ctrl-C and SLURM signal every process; a worker killed
    mid-batch would make the loader fail). Workers exit on their own when the process ends."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(
    dataset: LabeledImages,
    cfg: Config,
    sampler: EpochSampler | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Batches of ``cfg.batch_size``: a :class:`ResumableLoader` in ``sampler``'s order without a
    short last batch (for training), or, with no sampler, all images in order (for evaluation;
    this rank's :class:`ShardSampler` shard when ``world_size > 1``)."""
    settings: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "worker_init_fn": ignore_stop_signals if cfg.num_workers > 0 else None,
    }
    if sampler is not None:
        return ResumableLoader(dataset, sampler, **settings)
    shard = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
    return DataLoader(dataset, sampler=shard, **settings)
