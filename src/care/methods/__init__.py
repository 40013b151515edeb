"""Methods and their registry: a name in the config picks the class."""

from __future__ import annotations

from care.config import Config
from care.errors import CareError
from care.methods.base import ContrastiveMethod, DataInfo
from care.methods.care import CARE, EquiUnif
from care.methods.moco import CAREMoCo, KeyQueue, MoCo, momentum_update
from care.methods.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {
    cls.name: cls for cls in (SimCLR, CARE, EquiUnif, MoCo, CAREMoCo)
}


def build_method(cfg: Config, data: DataInfo) -> ContrastiveMethod:
    """The method named by ``cfg.method``."""
    if cfg.method not in METHODS:
        raise CareError(f"unknown method '{cfg.method}': choose one of {sorted(METHODS)}")
    return METHODS[cfg.method](cfg, data)


__all__ = [
    "CARE",
    "METHODS",
    "CAREMoCo",
    "ContrastiveMethod",
    "DataInfo",
    "EquiUnif",
    "KeyQueue",
    "MoCo",
    "SimCLR",
    "build_method",
    "momentum_update",
]
