"""Image folders: symbolic links, unreadable folders and files, and the typical image size."""

from __future__ import annotations

import builtins
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from care.data import FolderImages, load_dataset
from care.data.folder import scan_imagefolder, typical_image_side
from care.errors import CareError
from tests.data.writers import rng_images, write_png


def load(root: Path, split: str = "train") -> FolderImages:
    ds = load_dataset("imagefolder", root, split, load_size=4)
    assert isinstance(ds, FolderImages)
    return ds


def rel(ds: FolderImages, root: Path) -> list[str]:
    """The image paths of ``ds``, relative to ``root``, in dataset order."""
    return [os.path.relpath(ds.paths[i], root) for i in range(len(ds))]


def one_line(exc: pytest.ExceptionInfo[CareError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- symbolic links -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("train/a/here", "."),  # the class folder itself
        ("train/a/sub/up", ".."),  # its parent: the class folder
        ("train/a/sub/split", "../.."),  # the split folder
        ("train/a/root", "../.."),  # the dataset root (the link lies in the class folder)
        ("train/a/sub/abs", "ABS"),  # an absolute link to the class folder
    ],
)
def test_link_to_an_ancestor_is_a_loop(tmp_path: Path, link: str, target: str) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "train/a/sub/1.png", rng_images(1, (4, 4, 3)))
    target = str(tmp_path / "train/a") if target == "ABS" else target
    (tmp_path / link).symlink_to(target, target_is_directory=True)
    with pytest.raises(CareError) as exc:
        load(tmp_path)
    assert one_line(exc) == (
        f"imagefolder: symbolic link {tmp_path / link} -> {target} points to a folder that "
        "contains it, a loop; remove the link"
    )


@pytest.mark.parametrize("link", ["train/a/self", "train/a/self.png", "train/b"])
def test_link_to_itself_is_a_loop(tmp_path: Path, link: str) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    (tmp_path / link).symlink_to(Path(link).name)
    with pytest.raises(CareError) as exc:
        load(tmp_path)
    assert one_line(exc) == (
        f"imagefolder: symbolic link {tmp_path / link} -> {Path(link).name} leads back to "
        "itself, a loop; remove the link"
    )


def test_links_between_two_folders_are_a_loop(tmp_path: Path) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    (tmp_path / "train/a/x").symlink_to("y")
    (tmp_path / "train/a/y").symlink_to("x")
    with pytest.raises(CareError, match=r"symbolic link .*train/a/[xy] -> [xy] leads back"):
        load(tmp_path)


@pytest.mark.parametrize("absolute", [False, True])
def test_class_linked_into_another_class_counts_once(tmp_path: Path, absolute: bool) -> None:
    a0 = write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "train/a/deep/1.png", rng_images(1, (4, 4, 3)))
    write_png(tmp_path / "train/b/2.png", rng_images(2, (4, 4, 3)))
    target = tmp_path / "train/a" if absolute else Path("../a")
    (tmp_path / "train/b/link_to_a").symlink_to(target, target_is_directory=True)
    (tmp_path / "train/b/link_into_a").symlink_to(tmp_path / "train/a/deep")
    ds = load(tmp_path)
    assert rel(ds, tmp_path) == ["train/a/0.png", "train/a/deep/1.png", "train/b/2.png"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert torch.equal(ds[0][0], torch.from_numpy(np.asarray(Image.open(a0))).permute(2, 0, 1))


def test_class_folder_that_is_a_link_into_another_class(tmp_path: Path) -> None:
    """train/b -> a/sub: sub's images are b's (by its folder), not a's as well."""
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "train/a/sub/1.png", rng_images(1, (4, 4, 3)))
    (tmp_path / "train/b").symlink_to("a/sub")
    ds = load(tmp_path)
    assert rel(ds, tmp_path) == ["train/a/0.png", "train/b/1.png"]
    assert ds.labels.tolist() == [0, 1]


def test_two_class_folders_that_are_one_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    (tmp_path / "train/b").symlink_to("a")
    with pytest.raises(CareError) as exc:
        load(tmp_path)
    real = os.path.realpath(tmp_path / "train/a")
    assert one_line(exc) == (
        f"imagefolder: class folders {tmp_path / 'train/a'} and {tmp_path / 'train/b'} are the "
        f"same folder ({real}, by a symbolic link); remove the link or the class"
    )
    (tmp_path / "classes.txt").write_text("b\n")  # one of them only: fine
    ds = load_dataset("imagefolder", tmp_path, "train", class_list=tmp_path / "classes.txt")
    assert len(ds) == 1


def test_folder_reached_twice_in_one_class_is_walked_once(tmp_path: Path) -> None:
    write_png(tmp_path / "store/x/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "train/a/1.png", rng_images(1, (4, 4, 3)))
    (tmp_path / "train/a/l1").symlink_to(tmp_path / "store/x")
    (tmp_path / "train/a/l2").symlink_to(tmp_path / "store/x")
    (tmp_path / "train/a/sub").mkdir()
    (tmp_path / "train/a/sub/l3").symlink_to("../l1")
    (tmp_path / "train/a/l4").symlink_to(tmp_path / "store")  # contains x, walked once more
    ds = load(tmp_path)
    paths = rel(ds, tmp_path)
    assert len(paths) == 2 and paths[0] == "train/a/1.png"
    assert paths[1] in {"train/a/l1/0.png", "train/a/l2/0.png", "train/a/sub/l3/0.png"}
    assert {os.path.realpath(ds.paths[1])} == {os.path.realpath(tmp_path / "store/x/0.png")}


def test_a_dataset_of_links_into_another_tree(tmp_path: Path) -> None:
    """Linked image files, linked class folders and linked sub-folders outside the split work."""
    px = {n: rng_images(i, (4, 4, 3)) for i, n in enumerate(("c0", "c1", "d0", "d1", "e0"))}
    store = tmp_path / "store"
    write_png(store / "cats/c0.png", px["c0"])
    write_png(store / "cats/more/c1.png", px["c1"])
    write_png(store / "dogs/d0.png", px["d0"])
    write_png(store / "dogs2/d1.png", px["d1"])
    write_png(store / "emus/e0.png", px["e0"])
    data = tmp_path / "data"
    (data / "train/dog").mkdir(parents=True)
    (data / "train/cat").symlink_to(store / "cats")  # a linked class folder
    (data / "train/dog/d0.png").symlink_to(store / "dogs/d0.png")  # a linked image file
    (data / "train/dog/extra").symlink_to(store / "dogs2")  # a linked sub-folder
    (data / "train/emu").mkdir()
    (data / "train/emu/e0.jpg").symlink_to(store / "emus/e0.png")  # extension of the link
    (data / "train/emu/gone.png").symlink_to(store / "missing.png")  # dangling: fails on read
    ds = load(data)
    assert rel(ds, data) == [
        "train/cat/c0.png",
        "train/cat/more/c1.png",
        "train/dog/d0.png",
        "train/dog/extra/d1.png",
        "train/emu/e0.jpg",
        "train/emu/gone.png",
    ]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i, name in enumerate(("c0", "c1", "d0", "d1", "e0")):
        assert torch.equal(ds[i][0], torch.from_numpy(px[name]).permute(2, 0, 1))
    with pytest.raises(CareError, match=r"cannot read image .*gone.png: No such file or"):
        ds[5]


# --- unreadable folders ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "train/a/sub/1.png", rng_images(1, (4, 4, 3)))
    write_png(tmp_path / "train/b/2.png", rng_images(2, (4, 4, 3)))
    return tmp_path


def deny_scandir(monkeypatch: pytest.MonkeyPatch, path: Path, code: int) -> None:
    """``os.scandir(path)`` fails as on a folder without read permission (root reads any)."""
    real_scandir = os.scandir

    def fake_scandir(p: Any) -> Iterator[os.DirEntry[str]]:
        if str(p) == str(path):
            raise OSError(code, os.strerror(code), str(p))
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", fake_scandir)


@pytest.mark.parametrize("folder", ["train", "train/a", "train/a/sub", "train/b"])
@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.EACCES, r"Permission denied \(errno 13\)"),
        (errno.EIO, r"Input/output error \(errno 5\)"),
    ],
)
def test_unreadable_folder(
    tree: Path, monkeypatch: pytest.MonkeyPatch, folder: str, code: int, cause: str
) -> None:
    deny_scandir(monkeypatch, tree / folder, code)
    with pytest.raises(CareError) as exc:
        load(tree)
    assert re.fullmatch(
        f"imagefolder: cannot read {re.escape(str(tree / folder))}: {cause}; "
        "fix its permissions or remove it",
        one_line(exc),
    )


def test_unreadable_entry(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry whose type cannot be read (``stat`` of a link fails)."""
    (tree / "train/a/link").symlink_to(tree / "elsewhere")
    real_is_dir = os.DirEntry.is_dir

    def is_dir(self: os.DirEntry[str], *, follow_symlinks: bool = True) -> bool:
        if self.name == "link":
            raise PermissionError(errno.EACCES, "Permission denied", self.path)
        return real_is_dir(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "scandir", _wrapping_scandir(is_dir))
    with pytest.raises(CareError) as exc:
        load(tree)
    assert one_line(exc) == (
        f"imagefolder: cannot read {tree / 'train/a/link'}: Permission denied (errno 13); "
        "fix its permissions or remove it"
    )


def _wrapping_scandir(is_dir: Any) -> Any:
    """``os.scandir`` whose entries answer ``is_dir`` with ``is_dir`` (DirEntry is immutable)."""
    real_scandir = os.scandir

    class Entry:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.entry = entry
            self.name, self.path = entry.name, entry.path

        def is_dir(self) -> bool:
            return bool(is_dir(self.entry))

        def is_symlink(self) -> bool:
            return self.entry.is_symlink()

    class Scan:
        def __init__(self, path: Any) -> None:
            self.scan = real_scandir(path)

        def __enter__(self) -> Iterator[Entry]:
            return (Entry(e) for e in self.scan.__enter__())

        def __exit__(self, *args: object) -> None:
            self.scan.__exit__(*args)

    return Scan


def test_unsearchable_root(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = Path.stat

    def stat(self: Path, **kwargs: Any) -> os.stat_result:
        if self == tree / "train":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(CareError) as exc:
        load(tree)
    assert one_line(exc) == (
        f"imagefolder: cannot read {tree / 'train'}: Permission denied (errno 13); "
        "fix its permissions or remove it"
    )


# --- typical image size ---------------------------------------------------------------------------


def write_sized(path: Path, width: int, height: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (1, 2, 3)).save(path, format=fmt)
    return path


def test_typical_image_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        write_sized(tmp_path / f"train/a/{i}.png", 30, 20)  # shorter side 20
    for i in range(2):
        write_sized(tmp_path / f"train/b/{i}.jpg", 40, 50, "JPEG")  # 40
    write_sized(tmp_path / "train/c/0.png", 100, 10)  # 10
    write_sized(tmp_path / "val/a/0.png", 64, 96)
    (tmp_path / "val/b").mkdir()

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # headers only
    # sides 20 20 20 40 40 10: the lower median of [10, 20, 20, 20, 40, 40]
    assert typical_image_side(tmp_path, "pretrain", None) == 20
    assert typical_image_side(tmp_path, "train", None) == 20
    assert typical_image_side(tmp_path, "test", None) == 64
    (tmp_path / "classes.txt").write_text("b\nc\n")
    assert typical_image_side(tmp_path, "pretrain", tmp_path / "classes.txt") == 40  # 40 40 10
    # one sample: the middle file (3 of 0..5), b/0.jpg
    assert typical_image_side(tmp_path, "pretrain", None, samples=1) == 40
    with pytest.raises(ValueError, match="samples"):
        typical_image_side(tmp_path, "pretrain", None, samples=0)


def test_typical_image_side_samples_evenly(tmp_path: Path) -> None:
    for i in range(10):  # file i has shorter side 10 + i
        write_sized(tmp_path / f"train/k/{i:02d}.png", 10 + i, 50)

    def side(samples: int) -> int:
        return typical_image_side(tmp_path, "pretrain", None, samples)

    assert side(100) == 14  # all ten: the lower median of 10..19
    assert side(10) == 14
    assert side(1) == 15  # file 5, the middle
    assert side(2) == 12  # files 2 and 7, the middles of the halves
    assert side(5) == 15  # files 1, 3, 5, 7, 9
    assert typical_image_side(tmp_path, "pretrain", None) == 14  # samples=64: all ten


def test_typical_image_side_lists_files_as_loading_does(tmp_path: Path) -> None:
    """A class linked into another counts once: sides [10, 30, 30], not [10, 10, 30, 30]."""
    write_sized(tmp_path / "train/a/0.png", 10, 10)
    write_sized(tmp_path / "train/b/0.png", 30, 30)
    write_sized(tmp_path / "train/b/1.png", 30, 30)
    (tmp_path / "train/b/link_to_a").symlink_to("../a")
    _, paths, _ = scan_imagefolder(tmp_path, "train", None)
    assert paths == [str(load(tmp_path).paths[i]) for i in range(3)]
    assert typical_image_side(tmp_path, "pretrain", None) == 30


def test_typical_image_side_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sized(tmp_path / "train/a/0.png", 8, 8)
    bad = tmp_path / "train/a/1.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CareError) as exc:
        typical_image_side(tmp_path, "pretrain", None)
    assert re.fullmatch(r"corrupt image .*1\.png \(.*\); delete or replace the file", one_line(exc))
    write_sized(bad, 8, 8)
    assert typical_image_side(tmp_path, "pretrain", None) == 8
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(bad):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(CareError) as exc:
        typical_image_side(tmp_path, "pretrain", None)
    assert one_line(exc) == (
        f"cannot read image {bad}: Permission denied (errno 13); fix its permissions or remove it"
    )
    with pytest.raises(CareError, match="imagefolder: missing folder"):
        typical_image_side(tmp_path / "nowhere", "pretrain", None)
