"""Backbones, projection heads, the maps onto the sphere or the hyperboloid, and the encoder."""

from care.models.encoder import Encoder, build_encoder
from care.models.heads import (
    EMBEDDINGS,
    ProjectionHead,
    embed_projection,
    to_hyperboloid,
    to_sphere,
)
from care.models.pretrained import (
    ENCODER_FORMAT,
    ENCODER_LAYERS,
    EncoderSpec,
    Preprocess,
    TrainedEncoder,
    care_version,
    encoder_spec,
)
from care.models.resnet import ARCHITECTURES, STEMS, ResNet

__all__ = [
    "ARCHITECTURES",
    "EMBEDDINGS",
    "ENCODER_FORMAT",
    "ENCODER_LAYERS",
    "STEMS",
    "Encoder",
    "EncoderSpec",
    "Preprocess",
    "ProjectionHead",
    "ResNet",
    "TrainedEncoder",
    "build_encoder",
    "care_version",
    "embed_projection",
    "encoder_spec",
    "to_hyperboloid",
    "to_sphere",
]
