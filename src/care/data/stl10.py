"""STL-10: the official binary files (96x96x3, each channel stored column-major)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from care.data.base import UNLABELED, DatasetSpec, LoadOptions, TensorImages
from care.data.files import missing_file
from care.errors import CareError

SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE  # 27648
FOLDER = "stl10_binary"
CHUNK = 1024  # images per read: bounds the temporary buffer to ~28 MB


def count_images(path: Path) -> int:
    """Number of images in an ``*_X.bin`` file, checking its size."""
    size = path.stat().st_size
    if size % IMAGE_BYTES:
        raise CareError(
            f"{path}: size {size} bytes is not a multiple of {IMAGE_BYTES} (one 3x96x96 image); "
            "the file is truncated or corrupt; re-download it"
        )
    return size // IMAGE_BYTES


def read_images_into(path: Path, out: torch.Tensor) -> None:
    """Fill ``out`` ``(n, 3, 96, 96)`` (C, H, W) from the column-major file, chunk by chunk."""
    n = out.shape[0]
    buffer = bytearray(min(CHUNK, n) * IMAGE_BYTES)
    with path.open("rb") as f:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            if f.readinto(memoryview(buffer)[: k * IMAGE_BYTES]) != k * IMAGE_BYTES:
                raise CareError(f"{path} ended early while reading; re-download it")
            # file order per image: channel, then x (column), then y; swap to (C, H, W)
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=k * IMAGE_BYTES)
            raw = raw.view(k, 3, SIZE, SIZE)
            out[start : start + k].copy_(raw.transpose(2, 3))


def read_labels(path: Path, n: int, images_path: Path) -> npt.NDArray[np.int64]:
    """Labels 1..10 from a ``*_y.bin`` file, as 0..9."""
    labels = np.fromfile(path, dtype=np.uint8)
    if labels.size != n:
        raise CareError(
            f"{path} holds {labels.size} labels but {images_path} holds {n} images; "
            "the files do not belong together; re-download them"
        )
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise CareError(
            f"{path}: labels span {labels.min()}..{labels.max()}, outside 1..10; "
            "the file is corrupt; re-download it"
        )
    return labels.astype(np.int64) - 1


def load_stl10(spec: DatasetSpec, root: Path, split: str, options: LoadOptions) -> TensorImages:
    """STL-10: pretrain = train + unlabeled (label -1), train = train, test = test."""
    assert spec.num_classes is not None
    folder = root / FOLDER if (root / FOLDER).is_dir() else root
    part = "test" if split == "test" else "train"
    images_path, labels_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise missing_file(spec, folder, path.name)
    sources = [images_path]
    if split == "pretrain":
        unlabeled = folder / "unlabeled_X.bin"
        if not unlabeled.is_file():
            raise CareError(
                f"stl10: split 'pretrain' needs {unlabeled} (100k unlabeled images, 2.7 GB), "
                f"which is missing; extract the full stl10_binary.tar.gz into {root}, "
                "or pretrain on split 'train'"
            )
        sources.append(unlabeled)
    counts = [count_images(p) for p in sources]
    labels = read_labels(labels_path, counts[0], images_path)
    images = torch.empty((sum(counts), 3, SIZE, SIZE), dtype=torch.uint8)
    offset = 0
    for path, n in zip(sources, counts, strict=True):
        read_images_into(path, images[offset : offset + n])
        offset += n
    if len(counts) > 1:
        labels = np.concatenate([labels, np.full(counts[1], UNLABELED, dtype=np.int64)])
    return TensorImages(
        images,
        torch.from_numpy(labels),
        name=spec.name,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )
