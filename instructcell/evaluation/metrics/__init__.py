"""Evaluation metrics for InstructCell: the numeric code behind the ``metrics/*`` evaluate modules."""

from .classification import cell_classification_metrics
from .generation import (
    DEFAULT_KS,
    ReferenceEmbedding,
    cell_generation_metrics,
    compare_generators,
    embedding_metrics,
    gaussian_mmd,
    knn_bandwidth,
    mmd_gammas,
    normalize_log1p,
    pknn,
    sknn,
)

__all__ = [
    "DEFAULT_KS",
    "ReferenceEmbedding",
    "cell_classification_metrics",
    "cell_generation_metrics",
    "compare_generators",
    "embedding_metrics",
    "gaussian_mmd",
    "knn_bandwidth",
    "mmd_gammas",
    "normalize_log1p",
    "pknn",
    "sknn",
]
