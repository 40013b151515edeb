"""CIFAR-10 and CIFAR-100: the official Python-pickle batches, read with a restricted unpickler."""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import torch

from care.data.base import DatasetSpec, LoadOptions, TensorImages
from care.data.files import corrupt_file, missing_file
from care.errors import CareError

IMAGE_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps its batches."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: str
    archive: str


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ("train",), ("test",), "fine_labels", "cifar-100-python.tar.gz"
    ),
}


def _numpy_unpickle_helpers() -> tuple[Any, Any]:
    """numpy's ``_reconstruct`` and ``scalar`` (in ``numpy._core`` since numpy 2, else ``core``)."""
    try:
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct, module.scalar


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Rebuild bytes as Python 3 pickles (protocol < 3) do: ``_codecs.encode(s, 'latin1')``."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _empty_bytes() -> bytes:
    """What Python 3 pickles (protocol < 3) call to rebuild ``b''``: ``bytes()``."""
    return b""


_RECONSTRUCT, _SCALAR = _numpy_unpickle_helpers()

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # what Python 3 writes for protocol < 3
}
"""The only globals a CIFAR batch may reference: what numpy arrays and bytes need."""


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, strings and numbers, nothing else."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed globals; refuse everything else before it can run."""
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise CareError(
                f"refusing to unpickle {self.path}: it references {module}.{name}; "
                "the file is not a CIFAR batch; re-download it"
            )
        return found


def _get(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """``batch[key]`` with bytes keys (official Python 2 pickles) or str keys."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise CareError(f"{path} has no {key!r} entry; it is not a CIFAR batch; re-download it")


def read_batch(
    path: Path, label_key: str, num_classes: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """One batch file as ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``, fully checked."""
    try:
        with path.open("rb") as f:
            batch = ArrayUnpickler(f, path).load()
    except CareError:
        raise
    except Exception as exc:  # any failure to decode an untrusted pickle means a bad file
        raise corrupt_file(path, exc) from exc
    if not isinstance(batch, dict):
        raise CareError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch; re-download it")
    data = _get(batch, "data", path)
    is_array = isinstance(data, np.ndarray)
    if not (is_array and data.dtype == np.uint8 and data.shape[1:] == (IMAGE_BYTES,)):
        desc = f"{data.dtype} {data.shape}" if is_array else type(data).__name__
        raise CareError(f"{path}: data is {desc}, expected (N, 3072) uint8; re-download it")
    try:
        labels = np.asarray(_get(batch, label_key, path), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CareError(f"{path}: {label_key} are not integers ({exc}); re-download it") from exc
    if labels.shape != (data.shape[0],):
        raise CareError(
            f"{path}: {data.shape[0]} images but {label_key} has shape {labels.shape}; "
            "re-download it"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CareError(
            f"{path}: {label_key} span {labels.min()}..{labels.max()}, outside "
            f"0..{num_classes - 1}; re-download it"
        )
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), labels


def batch_folder(root: Path, layout: CifarLayout) -> Path:
    """The folder holding the batches: ``root/<folder>`` or ``root`` itself."""
    nested = root / layout.folder
    return nested if nested.is_dir() else root


def load_cifar(spec: DatasetSpec, root: Path, split: str, options: LoadOptions) -> TensorImages:
    """CIFAR-10/100: pretrain and train read the training batches, test the test batch."""
    assert spec.num_classes is not None
    layout = LAYOUTS[spec.name]
    folder = batch_folder(root, layout)
    names = layout.test if split == "test" else layout.train
    for name in names:
        if not (folder / name).is_file():
            if (root / layout.archive).is_file():
                raise CareError(
                    f"{spec.name}: found {root / layout.archive} but not its contents; "
                    f"extract it with: tar xzf {root / layout.archive} -C {root}"
                )
            raise missing_file(spec, folder, name)
    parts = [read_batch(folder / n, layout.label_key, spec.num_classes) for n in names]
    images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    if not images.flags.writeable:
        images = images.copy()
    return TensorImages(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        name=spec.name,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )
