"""Image folders (``root/train/<class>/*.jpg``), decoded lazily with PIL."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from care.data.base import DatasetSpec, LabeledImages, LoadOptions
from care.errors import CareError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""Accepted file extensions, compared lower-case (``.JPEG`` is accepted)."""

LAYOUT = "expected ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg"

LISTS_DIR = Path(__file__).resolve().parent / "lists"
"""Class lists shipped with the package (``care/data/lists/<name>.txt``)."""

BUILTIN_CLASS_LISTS: dict[str, str] = {
    "imagenet100": "the 100 ImageNet synsets of CMC (Tian et al., 2019), as in "
    "github.com/HobbitLong/CMC/blob/master/imagenet100.txt; the paper's ImageNet100",
}
"""Names that ``class_list`` accepts instead of a path, with where each list comes from."""


def resolve_class_list(value: str | Path) -> Path:
    """The file a ``class_list`` setting names: a built-in list for a bare built-in name
    (``imagenet100``), else the path itself (``./imagenet100`` forces a file of that name)."""
    text = str(value)
    if isinstance(value, str) and text.strip().lower() in BUILTIN_CLASS_LISTS:
        return LISTS_DIR / f"{text.strip().lower()}.txt"
    return Path(text).expanduser()


class PathTable:
    """Many paths in two numpy arrays (no per-path Python objects, cheap to share with workers)."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self.offsets: npt.NDArray[np.int64] = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob: npt.NDArray[np.uint8] = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.blob[start:end].tobytes())

    def head(self, n: int) -> PathTable:
        """The first ``n`` paths."""
        table = PathTable([])
        table.offsets = self.offsets[: n + 1]
        table.blob = self.blob[: int(self.offsets[n])]
        return table


def read_class_list(path: Path) -> list[str]:
    """Class folder names, one a line; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CareError(f"cannot read class list {path} ({exc}); pass class_list=PATH") from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise CareError(f"class list {path} names no classes; write one class folder per line")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise CareError(f"class list {path} names {n!r} twice; list each class once")
        seen.add(n)
    return names


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``path``."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    """Sorted paths of the image files under ``folder``, recursively."""
    found: list[str] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(e.path)
    return sorted(found)


def split_folder(root: Path, split: str) -> Path:
    """``root/train`` for pretrain and train; ``root/val`` (or ``root/test``) for test."""
    names = ("val", "test") if split == "test" else ("train",)
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(str(root / n) for n in names)
    raise CareError(f"imagefolder: missing folder {wanted}; {LAYOUT}; pass data_root=ROOT")


def find_classes(root: Path, folder: Path, class_list: Path | None) -> list[str]:
    """The classes, in label order: the class list, else the sorted class folders of train."""
    on_disk = set(_subfolders(folder))
    if class_list is not None:
        classes = read_class_list(class_list)
        for c in classes:
            if c not in on_disk:
                raise CareError(
                    f"class {c!r} in {class_list} has no folder {folder / c}; "
                    "fix the class list or the data"
                )
        return classes
    reference = root / "train" if (root / "train").is_dir() else folder
    classes = _subfolders(reference)
    if not classes:
        raise CareError(f"imagefolder: no class folders in {reference}; {LAYOUT}")
    extra = sorted(on_disk - set(classes))
    if extra:
        raise CareError(
            f"imagefolder: {folder / extra[0]} is not a class of {reference}; "
            "remove it or pass class_list=PATH"
        )
    return classes


class FolderImages(LabeledImages):
    """Images in class folders, decoded on access: RGB, shorter side resized, center-cropped."""

    def __init__(
        self,
        paths: PathTable,
        labels: torch.Tensor,
        classes: list[str],
        *,
        load_size: int,
        name: str = "imagefolder",
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__(name=name, channels=3, num_classes=len(classes), mean=mean, std=std)
        self.paths = paths
        self.labels = labels
        self.classes = classes
        self.load_size = load_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return decode_image(self.paths[i], self.load_size), int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.load_size, self.load_size

    def _take(self, n: int) -> FolderImages:
        return FolderImages(
            self.paths.head(n),
            self.labels[:n],
            self.classes,
            load_size=self.load_size,
            name=self.name,
            mean=self.mean,
            std=self.std,
        )


def decode_image(path: str, size: int) -> torch.Tensor:
    """Decode ``path`` as RGB, resize the shorter side to ``size`` (bilinear), center-crop."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
        array = np.array(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CareError(f"corrupt image {path} ({exc}); delete or replace the file") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_imagefolder(
    spec: DatasetSpec, root: Path, split: str, options: LoadOptions
) -> FolderImages:
    """Scan ``root/<split>/<class>/`` (fast: ``os.scandir``); images are decoded on access."""
    folder = split_folder(root, split)
    classes = find_classes(root, folder, options.class_list)
    paths: list[str] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        class_folder = folder / c
        if not class_folder.is_dir():  # a train class with no folder in val: no test images
            continue
        files = _image_files(str(class_folder))
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise CareError(f"imagefolder: no images ({exts}) in the class folders of {folder}")
    return FolderImages(
        PathTable(paths),
        torch.tensor(labels, dtype=torch.int64),
        classes,
        load_size=options.load_size,
        name=spec.name,
        mean=spec.mean,
        std=spec.std,
    )
