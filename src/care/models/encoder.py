"""The encoder f = embedding ∘ head ∘ backbone, built from a config (paper, Sec. 3 and 3.2).

:func:`build_encoder` is the one place that turns a config into a model: pretraining, the
linear probe and the equivariance measurements all build theirs with it.
"""

from __future__ import annotations

from torch import Tensor, nn

from care.config import Config
from care.models.heads import ProjectionHead, embed_projection
from care.models.resnet import ResNet


class Encoder(nn.Module):
    """f(x): backbone features, projected by the head, on the unit sphere or the hyperboloid.

    ``backbone`` alone gives the features a linear probe uses; the whole module gives the
    embeddings the losses see (paper, Principle 1; the hyperboloid of Sec. 3.2).
    """

    def __init__(
        self, backbone: ResNet, head: ProjectionHead, embedding: str, curvature: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding = embedding
        self.curvature = curvature

    def forward(self, x: Tensor) -> Tensor:
        return embed_projection(self.head(self.backbone(x)), self.embedding, self.curvature)


def build_encoder(cfg: Config, in_channels: int) -> Encoder:
    """The encoder ``cfg`` describes (``backbone``, ``stem``, ``widths``, ``head_hidden``,
    ``head_out``, ``embedding``, ``curvature``, ``activation_checkpointing``) for images with ``in_channels`` channels."""
    backbone = ResNet(
        cfg.backbone,
        in_channels=in_channels,
        stem=cfg.stem,
        widths=cfg.widths,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    head = ProjectionHead(backbone.feature_dim, cfg.head_hidden, cfg.head_out)
    return Encoder(backbone, head, cfg.embedding, cfg.curvature)
