"""MNIST and Fashion-MNIST: the IDX format, raw or gzip-compressed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from care.data.base import DatasetSpec, LoadOptions, TensorImages
from care.data.files import find_raw_or_gz, read_bytes
from care.errors import CareError

IDX_UBYTE = 0x08
"""IDX element-type code for unsigned bytes, the only type MNIST-style files use."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(data: npt.NDArray[np.uint8], ndim: int, path: Path) -> npt.NDArray[np.uint8]:
    """Check an IDX header (magic, type, ndim, dims vs payload) and return the payload array."""
    if data.size < 4 or data[0] != 0 or data[1] != 0:
        magic = bytes(data[:4]).hex()
        raise CareError(f"{path} is not an IDX file (magic number 0x{magic}); re-download it")
    if data[2] != IDX_UBYTE:
        raise CareError(
            f"{path}: IDX element type 0x{int(data[2]):02x} is not 0x08 (unsigned byte); "
            "use the original MNIST-format file"
        )
    if data[3] != ndim:
        raise CareError(
            f"{path}: IDX file has {int(data[3])} dimensions, expected {ndim} "
            "(images have 3, labels 1); check that the file is the right one"
        )
    header = 4 + 4 * ndim
    if data.size < header:
        raise CareError(f"{path}: IDX header is truncated; re-download it")
    dims = tuple(int(d) for d in data[4:header].view(">u4"))
    expected = math.prod(dims)
    got = data.size - header
    if got != expected:
        shape = " x ".join(str(d) for d in dims)
        raise CareError(
            f"{path}: header says {shape} = {expected} bytes but the file holds {got}; "
            "the file is truncated or corrupt; re-download it"
        )
    return data[header:].reshape(dims)


def read_idx(path: Path, ndim: int) -> npt.NDArray[np.uint8]:
    """Read an ``ndim``-dimensional unsigned-byte IDX file (raw or ``.gz``)."""
    return parse_idx(read_bytes(path), ndim, path)


def load_mnist(spec: DatasetSpec, root: Path, split: str, options: LoadOptions) -> TensorImages:
    """MNIST-format dataset: pretrain and train read the 60k train files, test reads t10k."""
    assert spec.num_classes is not None
    images_name, labels_name = FILES["test" if split == "test" else "train"]
    images_path = find_raw_or_gz(spec, root, images_name)
    labels_path = find_raw_or_gz(spec, root, labels_name)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise CareError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the files do not belong together; re-download them"
        )
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise CareError(
            f"{labels_path}: label {int(labels.max())} is outside 0..{spec.num_classes - 1}; "
            "the file is corrupt or not a labels file; re-download it"
        )
    return TensorImages(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        name=spec.name,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )
