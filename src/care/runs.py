"""Run directories: atomic writes, checkpoint I/O, the resume check, safetensors weights.

A run directory holds ``config.yaml``, ``checkpoints/{last,best}.ckpt``, ``backbone.safetensors``
and ``head.safetensors`` (the final weights), ``metrics.csv``, ``summary.json`` and one JSON (and
PNG) per evaluation. Every file is written to a temporary name in the same folder and renamed into
place, so a run killed at any moment never leaves a half-written file. Checkpoints are read with
``weights_only=True``; a run's trained encoder is rebuilt from its config and weights
(:func:`load_trained_encoder`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from care.config import Config, config_from_dict, to_yaml, training_differences
from care.errors import CareError
from care.models import build_encoder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Save a module's state dict as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(tensors))


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``module``; mismatches are a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CareError(f"weights file {path} not found: finish the run (resume=true) first")
    try:
        tensors: dict[str, Tensor] = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CareError(
            f"weights file {path} is corrupt ({str(exc)[:80]}); rerun the training"
        ) from None
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CareError(
            f"weights file {path} does not match the model in config.yaml "
            f"({str(exc).splitlines()[0][:120]})"
        ) from None


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
    metrics = property(lambda self: self.root / "metrics.csv")
    summary = property(lambda self: self.root / "summary.json")

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config, to_yaml(cfg))

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
        loaded = safe_torch_load(path, map_location="cpu")
        if not isinstance(loaded, dict):
            raise CareError(f"checkpoint {path} does not hold a training state")
        return loaded


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
    (``layer="backbone"``) or the whole :class:`care.models.Encoder` (``"projection"``)."""
    encoder = build_encoder(cfg, channels)
    load_weights(encoder.backbone, run.backbone)
    if layer == "backbone":
        return encoder.backbone.eval()
    load_weights(encoder.head, run.head)
    return encoder.eval()


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
