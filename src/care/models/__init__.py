"""Backbones and projection heads."""

from care.models.heads import ProjectionHead, to_sphere
from care.models.resnet import ARCHITECTURES, ResNet

__all__ = ["ARCHITECTURES", "ProjectionHead", "ResNet", "to_sphere"]
