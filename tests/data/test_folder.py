"""Image folders: scanning, class lists, decoding (resize + center crop), and errors."""

from __future__ import annotations

import builtins
import errno
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from care.data import FolderImages, load_dataset
from care.data.folder import (
    BUILTIN_CLASS_LISTS,
    LISTS_DIR,
    _to_rgb,
    decode_image,
    read_class_list,
    resolve_class_list,
)
from care.errors import CareError
from tests.data.writers import rng_images, write_png


def make_tree(root: Path) -> dict[str, np.ndarray]:
    """train/{cat,dog,emu} and val/{cat,dog}; returns some pixels written, by relative path."""
    pixels = {
        "train/cat/a.png": rng_images(0, (8, 8, 3)),  # already 8x8: no resize
        "train/cat/b.png": rng_images(1, (12, 8, 3)),  # 8 wide, 12 high: crop rows 2..9
        "train/dog/x.png": np.full((20, 30, 3), (10, 200, 30), np.uint8),  # solid: any resize
        "train/emu/deep/y.png": rng_images(2, (8, 8, 3)),  # nested folders are scanned
        "val/cat/c.png": rng_images(3, (8, 8, 3)),
        "val/dog/d.png": rng_images(4, (8, 8)),  # grayscale becomes RGB
    }
    for rel, px in pixels.items():
        write_png(root / rel, px)
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/cat/.hidden.png").write_bytes(b"")
    return pixels


def test_scan_and_decode(tmp_path: Path) -> None:
    px = make_tree(tmp_path)
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=8)
    assert isinstance(ds, FolderImages)
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 2]
    assert ds.image_shape == (3, 8, 8) and ds.channels == 3
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and label == 0
    assert torch.equal(image, torch.from_numpy(px["train/cat/a.png"]).permute(2, 0, 1))
    image, _ = ds[1]
    assert torch.equal(image, torch.from_numpy(px["train/cat/b.png"][2:10]).permute(2, 0, 1))
    image, label = ds[2]
    assert label == 1 and image.shape == (3, 8, 8)
    assert image[:, 4, 4].tolist() == [10, 200, 30] and bool((image == image[:, :1, :1]).all())
    assert ds[-1][1] == 2
    with pytest.raises(IndexError):
        ds[4]


def test_test_split_uses_train_classes(tmp_path: Path) -> None:
    px = make_tree(tmp_path)
    for split in ("pretrain", "train"):
        assert len(load_dataset("imagefolder", tmp_path, split, load_size=8)) == 4
    ds = load_dataset("imagefolder", tmp_path, "test", load_size=8)
    assert isinstance(ds, FolderImages)
    assert ds.classes == ["cat", "dog", "emu"] and ds.labels.tolist() == [0, 1]
    gray, _ = ds[1]
    assert torch.equal(gray, torch.from_numpy(px["val/dog/d.png"]).expand(3, 8, 8))


def test_test_folder_when_no_val(tmp_path: Path) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    write_png(tmp_path / "test/a/1.png", rng_images(1, (4, 4, 3)))
    ds = load_dataset("imagefolder", tmp_path, "test", load_size=4)
    assert len(ds) == 1


def test_extensions(tmp_path: Path) -> None:
    img = rng_images(0, (4, 4, 3))
    for name, fmt in (("a.JPEG", "JPEG"), ("b.jpg", "JPEG"), ("c.bmp", "BMP"), ("d.webp", "WEBP")):
        path = tmp_path / "train/k" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format=fmt)
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=4)
    assert len(ds) == 4
    assert all(ds[i][0].shape == (3, 4, 4) for i in range(4))


def test_default_load_size_and_subset(tmp_path: Path) -> None:
    make_tree(tmp_path)
    ds = load_dataset("imagefolder", tmp_path, "train")
    assert isinstance(ds, FolderImages)
    assert ds.image_shape == (3, 256, 256)
    assert ds[2][0].shape == (3, 256, 256)
    sub = ds.subset(2)
    assert isinstance(sub, FolderImages)
    assert len(sub) == 2 and sub.labels.tolist() == [0, 0] and sub.classes == ds.classes
    assert torch.equal(sub[1][0], ds[1][0])


def test_class_list(tmp_path: Path) -> None:
    make_tree(tmp_path)
    write_png(tmp_path / "val/emu/e.png", rng_images(5, (8, 8, 3)))
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\n\nemu\ncat  # felines\n")
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=8, class_list=classes)
    assert isinstance(ds, FolderImages)
    assert ds.classes == ["emu", "cat"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 1, 1]
    test = load_dataset("imagefolder", tmp_path, "test", load_size=8, class_list=str(classes))
    assert isinstance(test, FolderImages)
    assert test.labels.tolist() == [0, 1]
    (tmp_path / "val/emu/e.png").unlink()
    (tmp_path / "val/emu").rmdir()
    with pytest.raises(CareError, match=r"class 'emu' in .*classes.txt has no folder .*val/emu"):
        load_dataset("imagefolder", tmp_path, "test", class_list=classes)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cat\nlion\n", "class 'lion' in .*classes.txt has no folder"),
        ("cat\ncat\n", "names 'cat' twice"),
        ("# nothing\n\n", "names no classes"),
    ],
)
def test_bad_class_list(tmp_path: Path, text: str, match: str) -> None:
    make_tree(tmp_path)
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(CareError, match=match):
        load_dataset("imagefolder", tmp_path, "train", class_list=tmp_path / "classes.txt")


def test_missing_class_list_file(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with pytest.raises(CareError, match="cannot read class list"):
        load_dataset("imagefolder", tmp_path, "train", class_list=tmp_path / "nope.txt")


def test_val_class_not_in_train(tmp_path: Path) -> None:
    make_tree(tmp_path)
    write_png(tmp_path / "val/zebra/z.png", rng_images(0, (4, 4, 3)))
    with pytest.raises(CareError, match=r"val/zebra is not a class of .*train"):
        load_dataset("imagefolder", tmp_path, "test")


def test_missing_split_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (4, 4, 3)))
    with pytest.raises(CareError, match=r"missing folder .*val or .*test;.*data_root="):
        load_dataset("imagefolder", tmp_path, "test")
    with pytest.raises(CareError, match=r"missing folder .*train"):
        load_dataset("imagefolder", tmp_path / "train", "train")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    write_png(tmp_path / "train/loose.png", rng_images(0, (4, 4, 3)))
    with pytest.raises(CareError, match="no class folders in"):
        load_dataset("imagefolder", tmp_path, "train")


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "train/a/readme.txt").write_text("hi")
    with pytest.raises(CareError, match="no images"):
        load_dataset("imagefolder", tmp_path, "train")


def test_corrupt_image(tmp_path: Path) -> None:
    good = write_png(tmp_path / "train/a/0.png", rng_images(0, (16, 16, 3)))
    (tmp_path / "train/a/1.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    (tmp_path / "train/a/2.jpg").write_bytes(b"garbage")
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    for i, name in ((1, "1.png"), (2, "2.jpg")):
        with pytest.raises(CareError, match=f"corrupt image .*{name}.*delete or replace") as e:
            ds[i]
        assert "\n" not in str(e.value)


def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit-per-channel PNG of (H, W) gray or (H, W, 3) RGB ``values`` (written by hand: PIL
    cannot write 16-bit RGB)."""
    h, w = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = values.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def _round_257(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


@pytest.mark.parametrize(
    ("bits", "shape"), [(16, (256, 256)), (12, (64, 64))], ids=["16-bit", "12-bit"]
)
def test_16bit_grayscale_png_is_scaled_not_clipped(
    tmp_path: Path, bits: int, shape: tuple[int, int]
) -> None:
    ramp = np.arange(2**bits, dtype=np.uint16).reshape(shape)  # every value once
    path = tmp_path / "train/a/ramp.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # as PIL reads it (round trip)
    _png16(tmp_path / "train/a/by_hand.png", ramp)  # an encoder other than PIL's
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=shape[0])  # native: no resample
    for i in range(2):
        image, _ = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, *shape)
        expected = torch.from_numpy(_round_257(ramp)).expand(3, *shape)
        assert torch.equal(image, expected)
    if bits == 12:
        assert int(ds[0][0].max()) == 16  # 4095 / 257, not clipped to 255


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<i4"])
def test_16bit_modes_to_rgb(dtype: str) -> None:
    values = np.array([[0, 128, 129, 257, 32767, 32768, 65534, 65535]], dtype=dtype)
    img = Image.fromarray(values)
    assert img.mode in ("I;16", "I;16B", "I")
    rgb = np.asarray(_to_rgb(img))
    assert rgb.shape == (1, 8, 3)
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 1, 127, 128, 255, 255]
    assert (rgb == rgb[..., :1]).all()
    if dtype == "<i4":  # mode I holds 32 bits: outside 0..65535 is clipped
        wide = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
        assert np.asarray(_to_rgb(wide))[0, :, 0].tolist() == [0, 255]


def test_16bit_rgb_png_keeps_its_range(tmp_path: Path) -> None:
    """PIL reads 16-bit RGB PNGs as 8-bit RGB by their high byte: within 1 of ``v / 257``."""
    v = np.array([0, 1, 128, 129, 255, 256, 32767, 32768, 40000, 65279, 65280, 65535], np.uint16)
    values = np.stack([v, v[::-1], np.full_like(v, 4095)], axis=-1).reshape(3, 4, 3)
    path = _png16(tmp_path / "rgb16.png", values)
    got = decode_image(str(path), 3).permute(1, 2, 0).numpy()  # 3 high, 4 wide: 3 columns kept
    want = values[:, :3]
    assert np.array_equal(got, (want >> 8).astype(np.uint8))
    assert np.abs(got.astype(int) - _round_257(want).astype(int)).max() <= 1


def _deny_open(monkeypatch: pytest.MonkeyPatch, path: Path, code: int = errno.EACCES) -> None:
    """``open`` of ``path`` fails as an unreadable file would (root reads any file)."""
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(path):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize(
    ("code", "cause", "fix"),
    [
        (errno.EACCES, r"Permission denied \(errno 13\)", "fix its permissions or remove it"),
        (errno.EIO, r"Input/output error \(errno 5\)", "fix its permissions or remove it"),
        (errno.ENOENT, r"No such file or directory \(errno 2\)", "restore it or remove it"),
    ],
)
def test_unreadable_image_is_not_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, cause: str, fix: str
) -> None:
    write_png(tmp_path / "train/a/0.png", rng_images(0, (8, 8, 3)))
    bad = write_png(tmp_path / "train/a/1.png", rng_images(1, (8, 8, 3)))
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=8)
    _deny_open(monkeypatch, bad, code)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(
        CareError, match=f"^cannot read image {re.escape(str(bad))}: {cause}; {fix}$"
    ):
        ds[1]


def test_read_error_while_decoding_is_not_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error after the header was read (mid-file) is still "cannot read", not corrupt."""
    bad = write_png(tmp_path / "train/a/0.png", rng_images(0, (64, 64, 3)))
    real_open = builtins.open

    class Failing:
        def __init__(self, file: Any) -> None:
            self.file = file

        def read(self, n: int = -1) -> bytes:
            if self.file.tell() > 100:
                raise OSError(errno.EIO, "Input/output error")
            return bytes(self.file.read(n))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, *args, **kwargs)
        return Failing(opened) if str(file) == str(bad) else opened

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(
        CareError, match=r"^cannot read image .*0.png: Input/output error \(errno 5\)"
    ):
        decode_image(str(bad), 8)


def test_needs_explicit_root() -> None:
    with pytest.raises(CareError, match=r"imagefolder' needs an explicit folder.*data_root="):
        load_dataset("imagefolder", None, "train")


def test_builtin_imagenet100_list_is_the_cmc_subset() -> None:
    path = resolve_class_list("imagenet100")
    assert path == LISTS_DIR / "imagenet100.txt" and path.is_file()
    synsets = read_class_list(path)
    assert len(synsets) == 100 == len(set(synsets))
    assert all(re.fullmatch(r"n\d{8}", s) for s in synsets)
    # first and last lines of github.com/HobbitLong/CMC/blob/master/imagenet100.txt
    assert synsets[:3] == ["n02869837", "n01749939", "n02488291"]
    assert synsets[-2:] == ["n01855672", "n02090622"]
    assert "imagenet100" in BUILTIN_CLASS_LISTS


def test_class_list_by_builtin_name(tmp_path: Path) -> None:
    synsets = read_class_list(LISTS_DIR / "imagenet100.txt")
    for i, s in enumerate(synsets):
        write_png(tmp_path / "train" / s / "a.png", rng_images(i, (4, 4, 3)))
        (tmp_path / "val" / s).mkdir(parents=True)  # a listed class needs a folder in every split
    write_png(tmp_path / "train" / "n99999999" / "a.png", rng_images(0, (4, 4, 3)))  # not listed
    write_png(tmp_path / "val" / synsets[5] / "v.png", rng_images(0, (4, 4, 3)))
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=4, class_list="imagenet100")
    assert isinstance(ds, FolderImages)
    assert ds.classes == synsets and len(ds) == 100 and ds.labels.tolist() == list(range(100))
    test = load_dataset("imagefolder", tmp_path, "test", load_size=4, class_list="ImageNet100")
    assert isinstance(test, FolderImages) and test.labels.tolist() == [5]


def test_a_path_named_like_a_builtin_list_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet100").write_text("dog\ncat\n")
    assert resolve_class_list("./imagenet100") == Path("./imagenet100")
    assert resolve_class_list(Path("imagenet100")) == Path("imagenet100")
    ds = load_dataset("imagefolder", tmp_path, "train", load_size=8, class_list="./imagenet100")
    assert isinstance(ds, FolderImages) and ds.classes == ["dog", "cat"]
    with pytest.raises(CareError, match=r"class 'n02869837' in .*imagenet100.txt has no folder"):
        load_dataset("imagefolder", tmp_path, "train", load_size=8, class_list="imagenet100")
