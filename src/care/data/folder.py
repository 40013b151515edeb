"""Image folders (``root/train/<class>/*.jpg``), decoded lazily with PIL."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from care.data.base import DatasetSpec, LabeledImages, LoadOptions
from care.errors import CareError, os_error_cause

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


def _folder_error(path: str | Path, exc: OSError) -> CareError:
    """The one-line error for a folder (or folder entry) that could not be read."""
    return CareError(
        f"imagefolder: cannot read {path}: {os_error_cause(exc)}; fix its permissions or remove it"
    )


def _link_loop(link: str, why: str) -> CareError:
    """The one-line error for a directory link that leads back into itself."""
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return CareError(
        f"imagefolder: symbolic link {link} -> {target} {why}, a loop; remove the link"
    )


def _read_folder(path: str | Path, images: list[str]) -> list[tuple[os.DirEntry[str], bool]]:
    """The non-hidden sub-folders of ``path`` (links followed), each with whether it is a link;
    appends the paths of its image files to ``images``. ``os.scandir``: no ``stat`` per file."""
    folders: list[tuple[os.DirEntry[str], bool]] = []
    try:
        with os.scandir(path) as entries:
            for e in entries:
                name = e.name
                if name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        folders.append((e, e.is_symlink()))
                    elif name[name.rfind(".") :].lower() in IMAGE_EXTENSIONS:  # splitext, faster
                        images.append(e.path)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise _link_loop(e.path, "leads back to itself") from exc
                    raise _folder_error(e.path, exc) from exc
    except OSError as exc:
        raise _folder_error(path, exc) from exc
    return folders


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``path``."""
    return sorted(e.name for e, _ in _read_folder(path, []))


def _real_subfolders(path: Path) -> dict[str, str]:
    """The non-hidden sub-folders of ``path`` by name, with their real paths."""
    real = os.path.realpath(path)
    return {
        e.name: os.path.realpath(e.path) if is_link else os.path.join(real, e.name)
        for e, is_link in _read_folder(path, [])
    }


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _in_any(path: str, folders: frozenset[str]) -> bool:
    """Whether real path ``path`` is one of ``folders`` or lies inside one."""
    while path not in folders:
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return True


def _image_files(folder: str, real: str, class_reals: frozenset[str]) -> list[str]:
    """Sorted paths of the image files under class folder ``folder`` (real path ``real``).

    Sub-folders are walked recursively; directory links are followed, but a link to a folder
    that contains it is refused (a loop), one into a class folder of the split (``class_reals``,
    real paths) is skipped (those images count under their own class), and a directory reached
    twice is walked once. One ``realpath`` per linked directory, none per file.
    """
    found: list[str] = []
    seen = {real}
    stack = [(folder, real)]
    while stack:
        path, path_real = stack.pop()
        for e, is_link in _read_folder(path, found):
            if is_link:
                sub_real = os.path.realpath(e.path)
                if _inside(path_real, sub_real):
                    raise _link_loop(e.path, "points to a folder that contains it")
                if _in_any(sub_real, class_reals):
                    continue
            else:
                sub_real = os.path.join(path_real, e.name)
                if sub_real in class_reals:  # the real folder of another class (a linked class)
                    continue
            if sub_real not in seen:
                seen.add(sub_real)
                stack.append((e.path, sub_real))
    return sorted(found)


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder; an error other than "no such folder" is a one-line error."""
    try:
        return path.is_dir()
    except OSError as exc:
        raise _folder_error(path, exc) from exc


def split_folder(root: Path, split: str) -> Path:
    """``root/train`` for pretrain and train; ``root/val`` (or ``root/test``) for test."""
    names = ("val", "test") if split == "test" else ("train",)
    for name in names:
        if _is_dir(root / name):
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
    reference = root / "train" if _is_dir(root / "train") else folder
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


SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""PIL modes of 16-bit grayscale images (``I``: 32-bit, taken as 0..65535, clipped)."""

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _image_error(path: str, exc: BaseException) -> CareError:
    """One line for an image that failed: unreadable (an OS error: it carries an errno, PIL's
    own errors never do) or corrupt (read, but not decodable)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        fix = (
            "restore it or remove it"
            if exc.errno == errno.ENOENT
            else "fix its permissions or remove it"
        )
        return CareError(f"cannot read image {path}: {os_error_cause(exc)}; {fix}")
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return CareError(f"corrupt image {path} ({cause}); delete or replace the file")


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit grayscale is scaled (``round(v / 257)``: 65535 -> 255), not
    clipped at 255 as ``convert`` does. (PIL reads 16-bit RGB PNGs as 8-bit, by their high byte.)"""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    return img.convert("RGB")


def decode_image(path: str, size: int) -> torch.Tensor:
    """Decode ``path`` as RGB, resize the shorter side to ``size`` (bilinear), center-crop."""
    try:
        with Image.open(path) as img:
            rgb = _to_rgb(img)
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
        array = np.array(rgb, dtype=np.uint8)
    except _DECODE_ERRORS as exc:
        raise _image_error(path, exc) from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_side(path: str) -> int:
    """The shorter side of image ``path``, from its header (no pixels are decoded)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except _DECODE_ERRORS as exc:
        raise _image_error(path, exc) from exc
    return min(w, h)


def scan_imagefolder(
    root: Path, split: str, class_list: Path | None
) -> tuple[list[str], list[str], list[int]]:
    """The classes (label order), image paths and labels of a split: each class's files sorted,
    classes in label order. Raises the one-line error of a missing layout or no images."""
    folder = split_folder(root, split)
    classes = find_classes(root, folder, class_list)
    reals = _real_subfolders(folder)
    owner: dict[str, str] = {}  # real path -> the first class found there
    for c in classes:
        if c in reals and owner.setdefault(reals[c], c) != c:
            raise CareError(
                f"imagefolder: class folders {folder / owner[reals[c]]} and {folder / c} are "
                f"the same folder ({reals[c]}, by a symbolic link); remove the link or the class"
            )
    class_reals = frozenset(reals.values())
    paths: list[str] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        if c not in reals:  # a train class with no folder in val: no test images
            continue
        files = _image_files(str(folder / c), reals[c], class_reals)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise CareError(f"imagefolder: no images ({exts}) in the class folders of {folder}")
    return classes, paths, labels


def typical_image_side(root: Path, split: str, class_list: Path | None, samples: int = 64) -> int:
    """The median shorter side, in pixels, of up to ``samples`` images of a split.

    The images are spread evenly over the split's file list (as :func:`load_imagefolder` lists
    it: same classes, same link rules), so the pick is deterministic; only their headers are read.
    With an even count the lower middle value is taken (always the side of a sampled image).
    Raises the one-line errors of :func:`load_imagefolder` and :func:`decode_image`.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    _, paths, _ = scan_imagefolder(root, split, class_list)
    n = len(paths)
    k = min(samples, n)
    sides = sorted(image_side(paths[(2 * i + 1) * n // (2 * k)]) for i in range(k))
    return sides[(k - 1) // 2]


def load_imagefolder(
    spec: DatasetSpec, root: Path, split: str, options: LoadOptions
) -> FolderImages:
    """Scan ``root/<split>/<class>/`` (fast: ``os.scandir``); images are decoded on access."""
    classes, paths, labels = scan_imagefolder(root, split, options.class_list)
    return FolderImages(
        PathTable(paths),
        torch.tensor(labels, dtype=torch.int64),
        classes,
        load_size=options.load_size,
        name=spec.name,
        mean=spec.mean,
        std=spec.std,
    )
