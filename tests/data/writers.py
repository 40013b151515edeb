"""Write tiny datasets in their real on-disk formats (IDX, CIFAR pickles, STL-10, folders)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

U8 = npt.NDArray[np.uint8]


def rng_images(seed: int, shape: tuple[int, ...]) -> U8:
    """Random uint8 images, reproducible for a seed."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def idx_bytes(array: U8) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_file(path: Path, data: bytes, *, gz: bool = False) -> Path:
    """Write ``data`` to ``path`` (``path.gz``, gzip-compressed, when ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(root: Path, n_train: int = 5, n_test: int = 3, *, gz: bool = False) -> dict:
    """MNIST-format files; returns the arrays written, by split."""
    written = {}
    for part, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images = rng_images(seed, (n, 28, 28))
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_file(root / f"{part}-images-idx3-ubyte", idx_bytes(images), gz=gz)
        write_file(root / f"{part}-labels-idx1-ubyte", idx_bytes(labels), gz=gz)
        written[part] = (images, labels)
    return written


# --- CIFAR: pickles as the official Python 2 cPickle (protocol 2) files are written ---------------


def _py2_emit(obj: object, out: bytearray) -> None:
    """Emit ``obj`` with the opcodes Python 2's cPickle uses (bytes = py2 ``str``)."""
    if isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _py2_emit(k, out)
            _py2_emit(v, out)
        out += b"u"
    elif isinstance(obj, list):
        out += b"]("
        for v in obj:
            _py2_emit(v, out)
        out += b"e"
    elif isinstance(obj, tuple):
        out += b"("
        for v in obj:
            _py2_emit(v, out)
        out += b"t"
    elif isinstance(obj, bytes):
        if len(obj) < 256:
            out += b"U" + bytes([len(obj)]) + obj
        else:
            out += b"T" + struct.pack("<I", len(obj)) + obj
    elif obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    elif isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8
        # _reconstruct(ndarray, (0,), 'b'), then BUILD with the array's state
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        _emit_array_state(obj, out)
    else:
        raise TypeError(type(obj))


def _emit_array_state(array: U8, out: bytearray) -> None:
    """``(1, shape, dtype('u1'), False, raw)`` then BUILD, as numpy 1.x pickles arrays."""
    out += b"(K\x01"
    _py2_emit(tuple(array.shape), out)
    out += b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
    out += b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89"
    _py2_emit(np.ascontiguousarray(array).tobytes(), out)
    out += b"tb"


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled like Python 2's ``cPickle.dump(obj, f, 2)``."""
    out = bytearray(b"\x80\x02")
    _py2_emit(obj, out)
    return bytes(out + b".")


def cifar_batch(images: U8, labels: list[int], label_key: bytes = b"labels") -> dict:
    """A batch dict as in the official files: bytes keys, data (N, 3072) uint8 RGB planes."""
    n = images.shape[0]
    return {
        b"batch_label": b"training batch 1 of 1",
        label_key: labels,
        b"data": images.reshape(n, 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


# --- STL-10 ---------------------------------------------------------------------------------------


def stl10_bytes(images: U8) -> bytes:
    """(N, 3, 96, 96) CHW images in STL-10's layout: each channel stored column-major."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


# --- image folders --------------------------------------------------------------------------------


def write_png(path: Path, pixels: U8) -> Path:
    """Save (H, W, 3) or (H, W) uint8 pixels as a PNG (lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path
