"""File helpers shared by the readers: finding files, reading (gzip) bytes, clear errors."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from care.data.base import DatasetSpec
from care.errors import CareError


def missing_file(spec: DatasetSpec, root: Path, what: str) -> CareError:
    """The error for a file ``what`` (a name, possibly ``x[.gz]``) that is not in ``root``."""
    return CareError(
        f"{spec.name}: missing file {what} in {root}; {spec.download_hint}, or pass data_root=PATH"
    )


def corrupt_file(path: Path, detail: BaseException | str) -> CareError:
    """The error for a file that cannot be decoded."""
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {detail}" if str(detail) else type(detail).__name__
    return CareError(f"corrupt file {path} ({detail}); re-download it")


def find_raw_or_gz(spec: DatasetSpec, root: Path, name: str) -> Path:
    """``root/name`` if it exists, else ``root/name.gz``; a clear error if neither does."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise missing_file(spec, root, f"{name}[.gz]")


def read_bytes(path: Path) -> npt.NDArray[np.uint8]:
    """The file's bytes as a writable uint8 array, decompressed if the name ends in ``.gz``."""
    if path.suffix != ".gz":
        return np.fromfile(path, dtype=np.uint8)
    try:
        data = gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        raise corrupt_file(path, exc) from exc
    return np.frombuffer(bytearray(data), dtype=np.uint8)
