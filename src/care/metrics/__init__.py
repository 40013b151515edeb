"""Metrics of trained embeddings.

:mod:`care.metrics.equivariance`: how augmentations act on the embedding space (Wahba's problem,
the least-squares and group fits, form distortion, γ_f, composition; paper, Sections 3-4).
:mod:`care.metrics.knn`: weighted k-nearest-neighbour accuracy on frozen features.
"""

from care.metrics.equivariance import (
    EquivarianceReport,
    GroupFitResult,
    WahbaResult,
    as_float64,
    composition_error,
    embedding_pair,
    equivariance_report,
    form_distortion,
    group_fit,
    linear_fit,
    relative_equivariance,
    wahba_error,
)
from care.metrics.knn import weighted_knn_accuracy, weighted_knn_predict

__all__ = [
    "EquivarianceReport",
    "GroupFitResult",
    "WahbaResult",
    "as_float64",
    "composition_error",
    "embedding_pair",
    "equivariance_report",
    "form_distortion",
    "group_fit",
    "linear_fit",
    "relative_equivariance",
    "wahba_error",
    "weighted_knn_accuracy",
    "weighted_knn_predict",
]
