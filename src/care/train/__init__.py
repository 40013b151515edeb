"""Pretraining: a Lightning Trainer assembled from the config (:mod:`care.train.pretraining`) with
the callbacks of :mod:`care.train.callbacks`."""

from care.train.pretraining import pretrain

__all__ = ["pretrain"]
