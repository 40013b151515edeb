"""Methods and their registry: a name in the config picks the class.

Adding a method is one small file with a :class:`ContrastiveMethod` subclass and one entry in
:data:`METHODS`.
"""

from __future__ import annotations

from care.config import Config
from care.data import DataInfo
from care.errors import CareError
from care.methods.base import (
    SCHEDULERS,
    ContrastiveMethod,
    ViewPair,
    Views,
    WarmupCosine,
    step_seed,
)
from care.methods.care import CARE, EquiUnif
from care.methods.moco import CAREMoCo, KeyQueue, MoCo, momentum_update
from care.methods.optim import LARS, OPTIMIZERS
from care.methods.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {
    cls.name: cls for cls in (SimCLR, CARE, EquiUnif, MoCo, CAREMoCo)
}


def method_class(cfg: Config) -> type[ContrastiveMethod]:
    """The class of ``cfg.method``, after checking that ``cfg`` can train it."""
    if cfg.method not in METHODS:
        raise CareError(f"unknown method '{cfg.method}': choose one of {sorted(METHODS)}")
    cls = METHODS[cfg.method]
    cls.check_config(cfg)
    return cls


def views_label(cfg: Config) -> str | None:
    """``cfg.views`` for a method with group-shared views, else None (for summaries)."""
    return cfg.views if method_class(cfg).uses_groups else None


def build_method(cfg: Config, data: DataInfo) -> ContrastiveMethod:
    """The method named by ``cfg.method``."""
    return method_class(cfg)(cfg, data)


__all__ = [
    "CARE",
    "LARS",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "CAREMoCo",
    "ContrastiveMethod",
    "EquiUnif",
    "KeyQueue",
    "MoCo",
    "SimCLR",
    "ViewPair",
    "Views",
    "WarmupCosine",
    "build_method",
    "method_class",
    "momentum_update",
    "step_seed",
    "views_label",
]
