"""Backbones, projection heads, the maps onto the sphere or the hyperboloid, and the encoder."""

from care.models.encoder import Encoder, build_encoder
from care.models.heads import (
    EMBEDDINGS,
    ProjectionHead,
    embed_projection,
    to_hyperboloid,
    to_sphere,
)
from care.models.resnet import ARCHITECTURES, STEMS, ResNet

__all__ = [
    "ARCHITECTURES",
    "EMBEDDINGS",
    "STEMS",
    "Encoder",
    "ProjectionHead",
    "ResNet",
    "build_encoder",
    "embed_projection",
    "to_hyperboloid",
    "to_sphere",
]
