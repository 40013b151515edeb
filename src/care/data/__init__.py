"""Native readers for image-classification datasets (IDX, CIFAR pickles, STL-10, image folders).

``load_dataset(name, root, split)`` returns a ``LabeledImages``: uint8 ``(C, H, W)`` images with
integer labels (``-1`` = unlabeled) and the dataset's per-channel ``mean``/``std``.
:mod:`care.data.loading` goes from a config to its splits, their :class:`DataInfo` and batches.
"""

from __future__ import annotations

from care.data.base import DatasetSpec, LabeledImages, TensorImages
from care.data.folder import FolderImages
from care.data.loading import (
    DataInfo,
    EpochSampler,
    ImageSizes,
    ResumableLoader,
    ShardSampler,
    data_info,
    folder_image_sizes,
    load_split,
    make_loader,
    unshard,
)
from care.data.registry import DATASETS, load_dataset, resolve_data_root

__all__ = [
    "DATASETS",
    "DataInfo",
    "DatasetSpec",
    "EpochSampler",
    "FolderImages",
    "ImageSizes",
    "LabeledImages",
    "ResumableLoader",
    "ShardSampler",
    "TensorImages",
    "data_info",
    "folder_image_sizes",
    "load_dataset",
    "load_split",
    "make_loader",
    "resolve_data_root",
    "unshard",
]
