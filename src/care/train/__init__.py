"""Pretraining: a Lightning Trainer assembled from the config (:mod:`care.train.pretraining`) with
the callbacks of :mod:`care.train.callbacks`."""

from care.train.pretraining import cpu_has_native_bf16, pretrain

__all__ = ["cpu_has_native_bf16", "pretrain"]
