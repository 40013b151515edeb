"""Backbones, projection heads and the maps onto the sphere or the hyperboloid."""

from care.models.heads import ProjectionHead, embed_projection, to_hyperboloid, to_sphere
from care.models.resnet import ARCHITECTURES, ResNet

__all__ = [
    "ARCHITECTURES",
    "ProjectionHead",
    "ResNet",
    "embed_projection",
    "to_hyperboloid",
    "to_sphere",
]
