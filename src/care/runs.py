"""Run directories: atomic writes, checkpoint I/O, the resume check, safetensors weights.

A run directory holds ``config.yaml``, ``checkpoints/{last,best}.ckpt``, ``backbone.safetensors``
and ``head.safetensors`` (the final weights), ``metrics.csv``, ``summary.json`` and one JSON (and
PNG) per evaluation. Every file is written to a temporary name in the same folder and renamed into
place, so a run killed at any moment never leaves a half-written file. Checkpoints are read with
``weights_only=True``; a run's trained encoder is rebuilt from its config and weights
(:func:`load_trained_encoder`). A write that fails stops the run with one line naming the file and
the cause, and leaves the previous file as it was. A command that writes into a folder holds its
lock, ``.care.lock`` (:class:`RunLock`), so that two runs never write into one folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import pickle
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from care.config import Config, config_from_dict, to_yaml, training_differences
from care.data import DataInfo, LabeledImages, resolve_data_root
from care.data.loading import DEFAULT_IMAGE_SIZE
from care.data.registry import DEFAULT_LOAD_SIZE, get_spec
from care.distributed import is_global_zero
from care.errors import CareError, cannot_write, os_error_cause
from care.models import (
    ENCODER_FORMAT,
    ENCODER_LAYERS,
    EncoderSpec,
    TrainedEncoder,
    encoder_spec,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A write that fails (disk full, quota, permissions, read-only disk, file size limit) raises a
    one-line :class:`CareError` that names ``path``, the cause and the fix
    (:func:`care.errors.cannot_write`); the temp file is removed and a previous ``path`` is left
    as it was.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise cannot_write(path, exc) from None
        raise


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files as one result: every one to a temporary name first, then all renamed.

    A failure while writing leaves every previous file as it was; a failure between the renames
    (rare: a rename within a folder needs no data blocks) removes the files of this result that
    are already in place and those still to come, so the folder holds the old set or none of it,
    never a mix. Failures are one-line :class:`CareError` (:func:`care.errors.cannot_write`).
    """
    staged: list[tuple[str, Path]] = []
    try:
        for target, data in files.items():
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            failed = staged[-1][1] if staged else Path(next(iter(files)))
            raise cannot_write(failed, exc) from None
        raise
    for tmp, path in staged:
        try:
            os.replace(tmp, path)
        except OSError as exc:
            for _, other in staged:  # none of this result stays: neither new nor old files
                with contextlib.suppress(OSError):
                    os.unlink(other)
            for other_tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(other_tmp)
            raise cannot_write(path, exc) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: a file that carries pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CareError(f"checkpoint {path} not found: check the run directory")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsupported = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = (
            f"it references {unsupported.group(1)}" if unsupported else "it holds pickled objects"
        )
        raise CareError(
            f"refusing to load {path}: {what}, so it is not a plain weights checkpoint; "
            "only load checkpoints written by care"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CareError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
            "delete it and resume from another checkpoint"
        ) from None


def weights_bytes(module: torch.nn.Module, metadata: Mapping[str, str] | None = None) -> bytes:
    """A module's state dict as safetensors bytes, with string ``metadata`` (a run writes
    :meth:`care.models.EncoderSpec.to_metadata`: what rebuilds the model)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return save(tensors, metadata=None if metadata is None else dict(metadata))


def save_weights(
    module: torch.nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a module's state dict as safetensors (:func:`weights_bytes`), atomically."""
    atomic_write_bytes(path, weights_bytes(module, metadata))


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and string metadata of a safetensors file; a missing or corrupt file is a
    one-line error. (Nothing is checked against a model: :func:`load_weights` and
    :func:`load_encoder` check the header first, :func:`weights_header`.)"""
    path = _existing_weights(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()  # safe_open is not iterable
            tensors = {key: handle.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise _corrupt_weights(path, exc) from None
    return tensors, metadata


#: safetensors' names of the floating-point and the integer dtypes.
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_INTEGER_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """What a file says about one tensor, read without its data: the name of its dtype, its
    kind (``float``, ``integer`` or ``other``: bool, complex, 8-bit floats) and its shape."""

    dtype: str
    kind: str
    shape: tuple[int, ...]

    @classmethod
    def from_safetensors(cls, dtype: str, shape: Sequence[int]) -> StoredTensor:
        """A tensor as a safetensors header describes it (dtype ``F32``, ``I64``, ...)."""
        kind = (
            "float"
            if dtype in _FLOAT_DTYPES
            else "integer"
            if dtype in _INTEGER_DTYPES
            else "other"
        )
        return cls(dtype, kind, tuple(int(n) for n in shape))

    @classmethod
    def of(cls, tensor: Tensor) -> StoredTensor:
        """A tensor in memory (a checkpoint's, say)."""
        if tensor.is_floating_point() and tensor.element_size() > 1:
            kind = "float"
        elif tensor.is_complex() or tensor.is_floating_point() or tensor.dtype == torch.bool:
            kind = "other"
        else:
            kind = "integer"
        return cls(str(tensor.dtype).removeprefix("torch."), kind, tuple(tensor.shape))


def _tensor_name(name: object) -> str:
    """A tensor's name as a message shows it: quoted, on one line, at most 80 characters."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def state_mismatch(found: Mapping[str, StoredTensor], expected: Mapping[str, Tensor]) -> str | None:
    """Why tensors described by ``found`` cannot load into a model whose state dict is
    ``expected`` (a ``meta``-device one will do: only names, shapes and dtypes are read), on one
    line; None if they can. Every name must be there and no other; each tensor must have the
    model's shape, and be stored as a floating-point type where the model holds floats
    (parameters, BatchNorm statistics) and as integers where it holds integers
    (``num_batches_tracked``)."""
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"it lacks tensor {_tensor_name(missing[0])}{more}"
    for name, target in expected.items():
        stored = found[name]
        wanted = "float" if target.is_floating_point() else "integer"
        if stored.kind != wanted:
            needed = "a floating-point" if wanted == "float" else "an integer"
            return (
                f"tensor {_tensor_name(name)} is stored as {stored.dtype}, where the model needs "
                f"{needed} tensor"
            )
        if stored.shape != tuple(target.shape):
            return (
                f"tensor {_tensor_name(name)} has shape {list(stored.shape)}, where the model "
                f"needs {list(target.shape)}"
            )
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return (
            f"it holds tensor {_tensor_name(unexpected[0])}{more}, which the model has no place for"
        )
    return None


def nonfinite_tensor(tensors: Mapping[str, object]) -> str | None:
    """The name of the first floating-point tensor in ``tensors`` that holds NaN or inf (one
    ``isfinite`` pass over each, on its device); None if every one is finite."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            continue
        floating = tensor.is_floating_point() or tensor.is_complex()
        if floating and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def weights_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file as its header describes them (name → dtype, shape),
    and its string metadata; no tensor data is read. A missing or corrupt file is a one-line
    error."""
    path = _existing_weights(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            header: dict[str, StoredTensor] = {}
            names = handle.keys()  # safe_open is not iterable
            for name in names:
                stored = handle.get_slice(name)
                header[name] = StoredTensor.from_safetensors(
                    str(stored.get_dtype()), stored.get_shape()
                )
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise _corrupt_weights(path, exc) from None
    return header, metadata


def _existing_weights(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CareError(f"weights file {path} not found: finish the run (resume=true) first")
    return path


def _corrupt_weights(path: Path, exc: BaseException) -> CareError:
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:80]
    return CareError(f"weights file {path} is corrupt ({cause}); rerun the training")


def _check_header(
    path: Path, header: Mapping[str, StoredTensor], expected: Mapping[str, Tensor], model: str
) -> None:
    """Refuse, in one line naming ``path``, a file whose tensors (``header``) cannot load into
    ``expected`` (:func:`state_mismatch`), before any of its data is read."""
    problem = state_mismatch(header, expected)
    if problem is not None:
        raise CareError(
            f"weights file {path} does not match {model}: {problem}; rerun the training, or "
            "restore the file"
        )


def _read_checked(path: Path) -> dict[str, Tensor]:
    """The tensors of ``path``, refused in one line if one holds NaN or inf, or if BatchNorm
    running variances are negative (either gives NaN or meaningless embeddings)."""
    tensors, _ = read_weights(path)
    bad = nonfinite_tensor(tensors)
    if bad is not None:
        raise CareError(
            f"weights file {path} holds non-finite values (NaN or inf) in tensor "
            f"{_tensor_name(bad)}: rerun the training, or restore the file"
        )
    for name, tensor in tensors.items():
        if name.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CareError(
                f"weights file {path} holds negative variances in tensor {_tensor_name(name)}: "
                "rerun the training, or restore the file"
            )
    return tensors


def _load_state(module: torch.nn.Module, tensors: Mapping[str, Tensor], path: Path) -> None:
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CareError(
            f"weights file {path} does not match the model "
            f"({str(exc).splitlines()[0][:120]}); rerun the training, or restore the file"
        ) from None


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``module``. The file's header is checked against the
    module first (names, shapes, float or integer dtypes: :func:`state_mismatch`), then its
    values (no NaN or inf); any problem is a one-line error naming the file."""
    path = Path(path)
    header, _ = weights_header(path)
    _check_header(path, header, module.state_dict(), "the model")
    _load_state(module, _read_checked(path), path)


class RunDir:
    """Paths of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_checkpoint = property(lambda self: self.root / "checkpoints" / "last.ckpt")
    best_checkpoint = property(lambda self: self.root / "checkpoints" / "best.ckpt")
    backbone = property(lambda self: self.root / "backbone.safetensors")
    head = property(lambda self: self.root / "head.safetensors")
    encoder_export = property(lambda self: self.root / "encoder.pt2")
    metrics = property(lambda self: self.root / "metrics.csv")
    summary = property(lambda self: self.root / "summary.json")

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config, to_yaml(cfg))

    @staticmethod
    def with_data_root(cfg: Config) -> Config:
        """``cfg`` with ``data_root`` set to the absolute folder its data is read from, as a
        run's config.yaml records it (so the run names its data from any working directory)."""
        root = resolve_data_root(cfg.dataset, cfg.data_root).absolute()
        return dataclasses.replace(cfg, data_root=str(root))

    @staticmethod
    def weights_metadata(
        cfg: Config, info: DataInfo, images: LabeledImages, layer: str
    ) -> dict[str, str]:
        """The metadata a run's ``layer`` weights file carries: the encoder ``cfg`` trains on
        ``images`` (described by ``info``), rebuilt by :func:`load_encoder` without the config."""
        return encoder_spec(cfg, info, images.image_shape[-1]).to_metadata(layer)

    def write_encoder_export(self) -> Path | None:
        """:func:`export_encoder` into this finished run. A failure is one warning line on
        stderr, not an error: the weights files are written, and :func:`load_encoder` reads
        them."""
        try:
            return export_encoder(self.root)
        except Exception as exc:  # an optional file must not fail a finished training
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            print(
                f"warning: {self.encoder_export} not written ({cause}); care.load_encoder "
                "reads the run's weights files",
                file=sys.stderr,
            )
            return None

    def read_config(self) -> Config:
        """The config the run was trained with."""
        if not self.config.is_file():
            raise CareError(
                f"{self.root} is not a run directory (no config.yaml): pass the `out` "
                "folder of a `care pretrain` run"
            )
        values = OmegaConf.to_container(OmegaConf.load(self.config))
        if not isinstance(values, dict):
            raise CareError(f"{self.config} is not a mapping: the run directory is damaged")
        return config_from_dict({str(k): v for k, v in values.items()})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, written atomically and read back with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, read with ``weights_only=True`` onto the CPU and refused
        in one line naming it if it is not a training state (:func:`checkpoint_problem`) or if
        its weights or optimiser state hold NaN or inf (:func:`checkpoint_nonfinite`)."""
        loaded = safe_torch_load(path, map_location="cpu")
        problem = checkpoint_problem(loaded)
        if problem is not None:
            raise CareError(
                f"checkpoint {path} is not a training checkpoint of care: {problem}; delete it to "
                "start afresh, or put back the run's own checkpoints/last.ckpt"
            )
        bad = checkpoint_nonfinite(loaded)
        if bad is not None:
            raise CareError(
                f"checkpoint {path} holds non-finite weights (NaN or inf) in {bad}: the training "
                "had diverged when it was saved; delete it to start afresh (with a lower lr or a "
                "higher temperature), or put back an earlier checkpoint"
            )
        return loaded


#: What a training checkpoint must hold to resume (Lightning's keys) and of which type.
CHECKPOINT_KEYS: dict[str, type] = {
    "pytorch-lightning_version": str,
    "epoch": int,
    "global_step": int,
    "state_dict": dict,
    "optimizer_states": list,
    "lr_schedulers": list,
    "loops": dict,
}


def checkpoint_problem(loaded: object) -> str | None:
    """Why ``loaded`` (a file read by :func:`safe_torch_load`) cannot be a training checkpoint to
    resume, on one line: not a mapping, a key of :data:`CHECKPOINT_KEYS` missing or of another
    type, a ``state_dict`` that does not map names to tensors, optimiser or schedule states that
    are not dicts. None if it can."""
    if not isinstance(loaded, dict):
        return f"it holds a {type(loaded).__name__}, not a training state"
    for key, kind in CHECKPOINT_KEYS.items():
        if key not in loaded:
            return f"it has no {key!r}"
        value = loaded[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"its {key!r} is a {type(value).__name__}, not a {kind.__name__}"
    for name, tensor in loaded["state_dict"].items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            return f"its 'state_dict' holds {_tensor_name(name)}, which is not a named tensor"
    for key in ("optimizer_states", "lr_schedulers"):
        if not all(isinstance(state, dict) for state in loaded[key]):
            return f"its {key!r} holds something other than state dicts"
    return None


def _named_tensors(value: object, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its path (``prefix.key.0``)."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _named_tensors(item, f"{prefix}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _named_tensors(item, f"{prefix}.{index}")


def checkpoint_nonfinite(checkpoint: Mapping[str, Any]) -> str | None:
    """The first tensor of a checkpoint's weights (``state_dict``) or optimiser state that holds
    NaN or inf, as a message names it; None if all are finite. One ``isfinite`` pass over each
    floating-point tensor (on the CPU, where checkpoints are read)."""
    bad = nonfinite_tensor(checkpoint.get("state_dict", {}))
    if bad is not None:
        return f"tensor {_tensor_name(bad)}"
    optimizer = dict(_named_tensors(checkpoint.get("optimizer_states", []), "optimizer_states"))
    bad = nonfinite_tensor(optimizer)
    return None if bad is None else f"the optimiser state {bad}"


def open_run(cfg: Config) -> tuple[RunDir, Path | None]:
    """The run directory ``cfg.out`` and the checkpoint to resume from (None: a new run).

    A folder that holds a run is continued only with ``resume=true`` and the settings it was
    trained with (:func:`care.config.training_differences`; ``epochs`` may grow).
    """
    run = RunDir(cfg.out)
    if not run.last_checkpoint.is_file():
        return run, None
    if not cfg.resume:
        raise CareError(
            f"{run.root} already holds a run: pass resume=true to continue it, or choose "
            "another out=DIR"
        )
    saved = run.read_config()
    changed = training_differences(saved, cfg, allowed=("epochs",))
    if changed:
        key = changed[0]
        raise CareError(
            f"resume=true with a different '{key}' than the run in {run.root} "
            f"({getattr(saved, key)!r}): keep the run's settings or choose another out=DIR"
        )
    return run, run.last_checkpoint


def load_trained_encoder(run: RunDir, cfg: Config, channels: int, layer: str) -> nn.Module:
    """A finished run's encoder with its trained weights, in eval mode: the backbone alone
    (``layer="backbone"``) or the whole :class:`care.models.Encoder` (``"projection"``).

    It is the model :func:`load_encoder` rebuilds, from the metadata of the run's weights (from
    its config.yaml for runs written before they carried it), checked the same way. ``cfg``
    (the run's config, with evaluation settings) must agree with that metadata on the
    architecture and ``channels`` (the data's) with its input; a disagreement is one line naming
    both files.
    """
    encoder = _trained_encoder(run, layer)
    spec = encoder.spec
    ours = _config_architecture(cfg)
    for key, theirs in spec.architecture().items():
        if ours[key] != theirs:
            raise CareError(
                f"{run.config} and {run.backbone} disagree on '{key}' ({ours[key]!r} in the "
                f"config, {theirs!r} in the weights' metadata): put back the config.yaml the run "
                "was trained with, or rerun the training"
            )
    if spec.in_channels != channels:
        raise CareError(
            f"{run.backbone} takes {spec.in_channels}-channel images and the data of {run.config} "
            f"({cfg.dataset}) has {channels} channel(s): evaluate the run on images like those it "
            "was trained on"
        )
    return encoder.net.eval()


def _config_architecture(cfg: Config) -> dict[str, object]:
    """What :meth:`care.models.EncoderSpec.architecture` holds, as ``cfg`` has it."""
    return {
        "backbone": cfg.backbone,
        "stem": cfg.stem,
        "widths": [int(w) for w in cfg.widths],
        "head_hidden": int(cfg.head_hidden),
        "head_out": int(cfg.head_out),
        "embedding": cfg.embedding,
        "curvature": float(cfg.curvature),
    }


def _spec_from_config(run: RunDir, backbone: Mapping[str, StoredTensor]) -> EncoderSpec:
    """The encoder spec of a run whose weights carry no metadata (written before they did):
    its config.yaml, the registry's normalisation, the channels of its first convolution (read
    from the header of ``backbone.safetensors``, ``backbone``)."""
    cfg = run.read_config()
    stem = backbone.get("stem.0.weight")
    if stem is None or len(stem.shape) != 4:
        raise CareError(
            f"{run.backbone} holds no ResNet stem (stem.0.weight): it was not written by "
            "`care pretrain`; pass the out folder of a care run"
        )
    spec = get_spec(cfg.dataset)
    size = cfg.image_size or spec.image_size or DEFAULT_IMAGE_SIZE
    stored = spec.image_size or cfg.load_size or DEFAULT_LOAD_SIZE  # as care.data.data_info
    info = DataInfo(
        channels=int(stem.shape[1]),
        image_size=size,
        mean=spec.mean,
        std=spec.std,
        num_classes=spec.num_classes or 0,
        eval_crop_fraction=min(1.0, size / stored) if spec.image_size is None else 1.0,
    )
    encoder = encoder_spec(cfg, info, stored)
    try:
        encoder.check()
    except ValueError as exc:
        raise CareError(
            f"{run.backbone} carries no metadata and {run.config} with it describes no care "
            f"encoder ({exc}): rerun the training"
        ) from None
    return encoder


def _spec_from_metadata(path: Path, metadata: Mapping[str, str]) -> EncoderSpec:
    """The checked spec in the metadata of weights file ``path``, or a one-line error naming
    it."""
    try:
        return EncoderSpec.from_metadata(metadata)
    except ValueError as exc:
        if metadata.get("format") != ENCODER_FORMAT:
            raise CareError(
                f"weights file {path} has unreadable care metadata ({exc}); read it with the "
                "care version that wrote it, or rerun the training"
            ) from None
        raise CareError(
            f"weights file {path} has invalid care metadata ({exc}): rerun the training, or "
            "restore the file"
        ) from None


def _trained_encoder(run: RunDir, layer: str) -> TrainedEncoder:
    """The run's :class:`TrainedEncoder` of ``layer`` with its weights, in eval mode.

    The spec comes from the metadata of ``backbone.safetensors`` (every value checked) or, for
    runs written before weights carried it, from config.yaml. Before any model or tensor is
    allocated, the files' headers are checked against the encoder that spec describes, built on
    the ``meta`` device (names, shapes, float or integer dtypes: :func:`state_mismatch`); the
    weights are then read and refused if one holds NaN or inf. Every refusal is one line naming
    the weights file.
    """
    header, metadata = weights_header(run.backbone)
    if metadata:
        spec = _spec_from_metadata(run.backbone, metadata)
        model = f"the encoder that the metadata of {run.backbone.name} describes"
    else:
        spec = _spec_from_config(run, header)
        model = f"the encoder that {run.config} describes"
    with torch.device("meta"):  # names, shapes and dtypes without memory
        shapes = TrainedEncoder(spec, layer)
    _check_header(run.backbone, header, shapes.backbone.state_dict(), model)
    if shapes.head is not None:
        head_header, head_metadata = weights_header(run.head)
        if head_metadata:
            head_spec = _spec_from_metadata(run.head, head_metadata)
            ours, theirs = spec.architecture(), head_spec.architecture()
            key = next((k for k in ours if ours[k] != theirs[k]), None)
            if key is not None:
                raise CareError(
                    f"{run.head} and {run.backbone} disagree on '{key}' ({theirs[key]!r} and "
                    f"{ours[key]!r} in their metadata): they come from different runs; put back "
                    "the run's own files, or rerun the training"
                )
        _check_header(run.head, head_header, shapes.head.state_dict(), model)
    encoder = TrainedEncoder(spec, layer)
    _load_state(encoder.backbone, _read_checked(run.backbone), run.backbone)
    if encoder.head is not None:
        _load_state(encoder.head, _read_checked(run.head), run.head)
    return encoder.eval()


def load_encoder(run_dir: str | Path, layer: str = "backbone") -> TrainedEncoder:
    """A finished run's encoder as one module in eval mode: images as the run's dataset stores
    them, uint8 ``(N, C, H, W)`` in 0..255 or float in [0, 1], → embeddings.

    The run's evaluation transform (central crop, resize to ``image_size``, the dataset's mean
    and std) is inside the module. ``layer="backbone"`` gives the features a linear probe uses;
    ``"projection"`` the head's output on the run's sphere or hyperboloid. The model is rebuilt
    from the metadata of ``backbone.safetensors`` (from ``config.yaml`` for runs written before
    weights carried it); every metadata value, then every tensor's name, dtype and shape is
    checked before anything is allocated, and the weights' values once read. Bad run
    directories, files and layers are a one-line :class:`CareError`.
    """
    if layer not in ENCODER_LAYERS:
        raise CareError(
            f"unknown layer {layer!r}: choose backbone (the features a linear probe uses) or "
            "projection (the head's output on the run's sphere or hyperboloid)"
        )
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise CareError(
            f"run directory {run.root} not found: pass the out folder of a `care pretrain` run"
        )
    if not run.backbone.is_file():
        raise CareError(
            f"{run.root} holds no backbone.safetensors: pass the out folder of a finished "
            "`care pretrain` run (an interrupted one finishes with resume=true)"
        )
    return _trained_encoder(run, layer)


def export_encoder(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a run's backbone with its evaluation transform as a :func:`torch.export.export`
    program (``RUN/encoder.pt2`` by default), which PyTorch alone loads:
    ``torch.export.load(path).module()`` takes float ``(N, C, S, S)`` images in [0, 1] (any N;
    ``S`` the side the dataset stores, ``input_size``; uint8 images: ``images.float() / 255``)
    and returns the features :func:`load_encoder` returns. The spec's metadata is the archive's
    extra file ``care.json``. Weights are stored as raw bytes, the graph as JSON: no pickle."""
    encoder = load_encoder(run_dir, "backbone")
    spec = encoder.spec
    target = Path(out) if out is not None else RunDir(run_dir).encoder_export
    example = torch.rand(2, spec.in_channels, spec.input_size, spec.input_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(encoder, (example,), dynamic_shapes=({0: batch},))
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)  # where care's source lies here: not the model's
    buffer = io.BytesIO()
    extra = {"care.json": json.dumps(spec.to_metadata("backbone"), indent=1)}
    torch.export.save(program, buffer, extra_files=extra)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def json_ready(value: Any) -> Any:
    """Tensors and numpy scalars → plain Python, recursively (for JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# --- One run per folder -------------------------------------------------------------------------

#: Name of the lock file a live command keeps in the folder it writes.
LOCK_NAME = ".care.lock"
#: Seconds between two refreshes of the lock file's mtime by its holder (the heartbeat).
HEARTBEAT_S = 30.0
#: A lock written on another host whose mtime is older than this (seconds) is stale: its holder
#: stopped refreshing it (killed, or its node died). Keep it several heartbeats long.
STALE_AFTER_S = 120.0
#: An unreadable lock file (empty or cut short: its writer may be between create and write) is
#: left alone for this many seconds after its last change, then it is stale.
WRITING_GRACE_S = 5.0
#: A stale-lock breaker file older than this (seconds) was left by a process killed while it
#: broke a stale lock (a few system calls), and is removed.
BREAK_STALE_S = 10.0


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat);
    None where /proc does not tell (no such process, not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name (field 2) may hold spaces and ")"
    try:
        return int(fields[19])  # fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the process that holds it."""

    pid: int
    hostname: str
    command: str
    started: str
    process_start: int | None
    token: str

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder in a lock file's text; None for an empty or damaged file."""
        try:
            data = json.loads(text)
            holder = cls(
                pid=data["pid"],
                hostname=data["hostname"],
                command=data["command"],
                started=data["started"],
                process_start=data.get("process_start"),
                token=data["token"],
            )
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(holder.pid, int) or not isinstance(holder.hostname, str):
            return None
        return holder

    def since(self) -> str:
        try:
            return datetime.datetime.fromisoformat(self.started).strftime("%Y-%m-%d %H:%M:%S")
        except (TypeError, ValueError):
            return str(self.started)


@dataclasses.dataclass(frozen=True)
class _Seen:
    """One reading of the lock file: its holder (None: unreadable), inode and age."""

    holder: LockHolder | None
    inode: tuple[int, int]
    age_s: float


class RunLock:
    """``with RunLock(folder, command="care pretrain"):`` — one command at a time in ``folder``.

    The lock is the file ``folder/.care.lock`` (the folder is made if needed; if this lock made
    it and it is still empty on release, it is removed again). It is created with
    ``O_CREAT | O_EXCL`` and holds JSON: pid, hostname, command, start time (ISO) and the
    process start time from ``/proc/PID/stat`` (field 22), so that a reused pid is not taken
    for the holder. A daemon thread refreshes its mtime every :data:`HEARTBEAT_S` seconds.

    If the file exists, its holder is judged:

    - same host: alive if the pid exists (``os.kill(pid, 0)``; EPERM counts as alive) and its
      /proc start time is the recorded one;
    - another host (a shared file system): alive if the file's mtime is less than
      :data:`STALE_AFTER_S` seconds old;
    - an unreadable file (empty or damaged: a process killed while writing it, or one writing
      it right now): left alone while its mtime is less than :data:`WRITING_GRACE_S` seconds
      old (acquisition waits that long for it to become readable), then stale.

    A live holder is refused with one :class:`CareError` line naming it. A stale lock is taken
    over: breakers serialise on ``.care.lock.break`` (``O_EXCL``), re-judge the lock there and
    remove it, then everyone races the ``O_EXCL`` create again, so exactly one process wins.
    (A breaker file older than :data:`BREAK_STALE_S` s is removed; only a process killed in
    those few system calls while another one breaks the same lock could let two in.)

    On exit (normal or exception) the heartbeat stops and the file is removed if it is still
    this lock's. Locks of different folders nest freely (``care ablate`` holds OUT while each
    variant's pretraining holds OUT/<variant>); a second lock of the same folder is refused even
    within one process. ``hint`` is the last part of the refusal (how to pick another folder).
    """

    def __init__(
        self, folder: str | Path, command: str, hint: str = "choose another out=DIR"
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.breaker = self.folder / f"{LOCK_NAME}.break"
        self.command, self.hint = command, hint
        self._fd: int | None = None
        self._token = ""
        self._owner_pid = 0
        self._made_folder = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise a one-line :class:`CareError` naming the live holder."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self._made_folder = not self.folder.is_dir()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_write(self.path, exc) from None
        deadline = time.monotonic() + max(WRITING_GRACE_S, BREAK_STALE_S) + 10.0
        while time.monotonic() < deadline:
            if self._create():
                self._start_heartbeat()
                return
            seen = self._read()
            if seen is None:  # removed meanwhile: race for it again
                continue
            state = self._judge(seen)
            if state == "alive":
                assert seen.holder is not None
                raise CareError(self._busy(seen.holder, seen.age_s))
            if state == "writing":
                time.sleep(0.05)
            else:
                self._break(seen)
        raise CareError(
            f"could not lock {self.folder}: its lock file {self.path} keeps changing; try again, "
            f"or {self.hint}"
        )

    def release(self) -> None:
        """Stop the heartbeat; remove the lock file if it is still this lock's."""
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
        if os.getpid() != self._owner_pid:  # a forked child leaves its parent's lock alone
            return
        seen = self._read()
        if seen is not None and seen.holder is not None and seen.holder.token == self._token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if empty: the run failed before writing anything

    # -- internals ---------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "hostname": socket.gethostname(),
            "command": self.command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "process_start": process_start_time(pid),
            "token": uuid.uuid4().hex,
        }

    def _create(self) -> bool:
        """Create the lock file with O_EXCL and write this process's record; False if it exists
        (or if a breaker judged our half-written file stale and removed it)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise cannot_write(self.path, exc) from None
        record = self._record()
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
            mine = os.fstat(fd)
            now = os.stat(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # remove our half-written file, not another's
                if os.path.samestat(os.stat(self.path), os.fstat(fd)):
                    self.path.unlink()
            os.close(fd)
            if isinstance(exc, FileNotFoundError):
                return False
            raise cannot_write(self.path, exc) from None
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):  # taken over meanwhile
            os.close(fd)
            return False
        self._fd, self._token, self._owner_pid = fd, record["token"], os.getpid()
        return True

    def _read(self) -> _Seen | None:
        """The lock file as it is now; None if there is none."""
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                text = handle.read(65536).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CareError(
                f"cannot read the lock file {self.path}: {os_error_cause(exc)}: fix the folder's "
                f"permissions or {self.hint}"
            ) from None
        return _Seen(
            LockHolder.parse(text), (stat.st_dev, stat.st_ino), time.time() - stat.st_mtime
        )

    def _judge(self, seen: _Seen) -> str:
        """``alive``, ``writing`` (unreadable, too young to call stale) or ``stale``."""
        holder = seen.holder
        if holder is None:
            return "writing" if seen.age_s < WRITING_GRACE_S else "stale"
        if holder.hostname != socket.gethostname():
            return "alive" if seen.age_s < STALE_AFTER_S else "stale"
        if not _pid_alive(holder.pid):
            return "stale"
        now = process_start_time(holder.pid)
        if holder.process_start is not None and now is not None and now != holder.process_start:
            return "stale"  # the pid was reused by another process
        return "alive"

    def _break(self, judged: _Seen) -> None:
        """Remove a stale lock file, serialised with other breakers on the breaker file."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.breaker, flags, 0o644)
        except FileExistsError:  # another process is breaking it; unless it died doing so
            with contextlib.suppress(OSError):
                if time.time() - self.breaker.stat().st_mtime > BREAK_STALE_S:
                    self.breaker.unlink()
            time.sleep(0.01)
            return
        except OSError as exc:
            raise cannot_write(self.breaker, exc) from None
        try:
            os.close(fd)
            seen = self._read()  # judge again: it may have been replaced since
            if seen is not None and seen.inode == judged.inode and self._judge(seen) == "stale":
                self.path.unlink()
        finally:
            with contextlib.suppress(OSError):
                self.breaker.unlink()

    def _busy(self, holder: LockHolder, age_s: float) -> str:
        where = f"pid {holder.pid} on host {holder.hostname}, since {holder.since()}"
        if holder.hostname != socket.gethostname():
            where += f", alive {age_s:.0f} s ago"
        return (
            f"{self.folder} is in use by {holder.command} ({where}): wait for it, stop it, "
            f"or {self.hint}"
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"care-lock-heartbeat {self.folder}", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        """Refresh the lock file's mtime (through our own descriptor: never another's lock)."""
        while not self._stop.wait(HEARTBEAT_S):
            fd = self._fd
            if fd is None:
                return
            with contextlib.suppress(OSError):
                os.utime(fd)


def rank_zero_lock(
    folder: str | Path, command: str, hint: str = "choose another out=DIR"
) -> contextlib.AbstractContextManager[RunLock | None]:
    """:class:`RunLock` of ``folder`` on the global-zero process, a no-op on the other ranks
    (they write nothing there). Call it before the process group exists: the rank is the one the
    launcher gave (Lightning, torchrun: ``RANK``/``LOCAL_RANK``/``NODE_RANK``; ``srun``, which
    starts every task itself: ``SLURM_PROCID``)."""
    if is_global_zero() and os.environ.get("SLURM_PROCID", "0") in ("", "0"):
        return RunLock(folder, command, hint)
    return contextlib.nullcontext()
