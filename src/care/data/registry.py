"""The dataset registry: names, normalisation stats, where the data lives, and ``load_dataset``."""

from __future__ import annotations

import os
from pathlib import Path

from care.data.base import DatasetSpec, LabeledImages, LoadOptions
from care.data.cifar import load_cifar
from care.data.folder import load_imagefolder, resolve_class_list
from care.data.idx import load_mnist
from care.data.stl10 import load_stl10
from care.errors import CareError

SPLITS = ("pretrain", "train", "test")
"""pretrain: images for self-supervised pretraining; train: labelled probe training set; test."""

DEFAULT_LOAD_SIZE = 256
"""Image-folder images are resized and center-cropped to this size unless told otherwise."""

SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
"""Searched last by ``resolve_data_root`` (Debian's dataset-fashion-mnist installs here)."""

_CIFAR = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            channels=1,
            num_classes=10,
            image_size=28,
            mean=(0.1307,),
            std=(0.3081,),
            loader=load_mnist,
            download_hint="download it from https://yann.lecun.com/exdb/mnist/",
        ),
        DatasetSpec(
            name="fashion-mnist",
            channels=1,
            num_classes=10,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            loader=load_mnist,
            download_hint="run `make data` or download it from "
            "https://github.com/zalandoresearch/fashion-mnist",
        ),
        DatasetSpec(
            name="cifar10",
            channels=3,
            num_classes=10,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            loader=load_cifar,
            download_hint=f"download and extract cifar-10-python.tar.gz from {_CIFAR}",
        ),
        DatasetSpec(
            name="cifar100",
            channels=3,
            num_classes=100,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            loader=load_cifar,
            download_hint=f"download and extract cifar-100-python.tar.gz from {_CIFAR}",
        ),
        DatasetSpec(
            name="stl10",
            channels=3,
            num_classes=10,
            image_size=96,
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            loader=load_stl10,
            download_hint="download and extract stl10_binary.tar.gz from "
            "https://cs.stanford.edu/~acoates/stl10/",
        ),
        DatasetSpec(
            name="imagefolder",
            channels=3,
            num_classes=None,
            image_size=None,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            loader=load_imagefolder,
            download_hint="put the images in ROOT/train/<class>/ and ROOT/val/<class>/",
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name`` (case and ``_``/``-`` insensitive)."""
    spec = DATASETS.get(name.strip().lower().replace("_", "-"))
    if spec is None:
        raise CareError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    return spec


def resolve_data_root(name: str, root: str | Path | None) -> Path:
    """``root`` if given, else the first existing of ``$CARE_DATA/<name>``, ``./data/<name>``,
    ``/usr/share/datasets/<name>``."""
    spec = get_spec(name)
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    if spec.name == "imagefolder":
        raise CareError(
            "dataset 'imagefolder' needs an explicit folder: pass data_root=ROOT "
            "(with ROOT/train/<class>/ and ROOT/val/<class>/)"
        )
    candidates: list[Path] = []
    env = os.environ.get("CARE_DATA")
    if env:
        candidates.append(Path(env).expanduser() / spec.name)
    candidates.append(Path.cwd() / "data" / spec.name)
    candidates.extend(d / spec.name for d in SYSTEM_DATA_DIRS)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    hint = " (or run `make data`)" if spec.name == "fashion-mnist" else ""
    raise CareError(
        f"dataset {spec.name!r} not found: looked in {looked}; "
        f"download it there or pass data_root=PATH{hint}"
    )


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    *,
    load_size: int | None = None,
    class_list: str | Path | None = None,
) -> LabeledImages:
    """Read one split (``pretrain``, ``train`` or ``test``) of a registered dataset.

    ``class_list`` (imagefolder only) is a file with one class folder per line, or the name of a
    built-in list (``imagenet100``: the CMC ImageNet100 synsets).
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise CareError(f"unknown split {split!r} for {spec.name}: use one of {', '.join(SPLITS)}")
    if load_size is not None and (
        isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < 1
    ):
        raise CareError(f"load_size={load_size!r} is not a positive integer; use e.g. 256")
    if spec.image_size is not None:
        if load_size is not None and load_size != spec.image_size:
            raise CareError(
                f"load_size={load_size} applies only to imagefolder: {spec.name} images are "
                f"{spec.image_size}x{spec.image_size}; drop load_size"
            )
        if class_list is not None:
            raise CareError(f"class_list applies only to imagefolder, not {spec.name}; drop it")
    path = resolve_data_root(spec.name, root)
    if not path.is_dir():
        raise CareError(f"data_root {path} for {spec.name} is not a folder; pass data_root=PATH")
    options = LoadOptions(
        load_size=DEFAULT_LOAD_SIZE if load_size is None else load_size,
        class_list=None if class_list is None else resolve_class_list(class_list),
    )
    return spec.loader(spec, path, split, options)
