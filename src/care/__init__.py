"""CARE: Contrastive Augmentation-induced Rotational Equivariance."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from care.errors import CareError

if TYPE_CHECKING:
    from care.runs import load_encoder

__version__ = "0.1.0"
__all__ = ["CareError", "__version__", "load_encoder"]


def __getattr__(name: str) -> Any:
    """``care.load_encoder`` (:func:`care.runs.load_encoder`), imported on first use, so that
    ``import care`` stays light: the CLI parses its arguments before it loads PyTorch."""
    if name == "load_encoder":
        return importlib.import_module("care.runs").load_encoder
    raise AttributeError(f"module 'care' has no attribute {name!r}")
