"""Applications of DICE influence: anomaly detection, collaborator selection and
contribution accounting. Apps compose the core; they import no CLI or plotting code."""

from dicejax.apps import anomaly, collaborators, contribution
from dicejax.apps.anomaly import (
    Detection,
    DetectionMetrics,
    accumulate,
    detect,
    edge_labels,
    evaluate,
    in_edges,
    proximal_steps,
    robust_zscores,
    roc_auc,
)

__all__ = [
    "Detection",
    "DetectionMetrics",
    "accumulate",
    "anomaly",
    "collaborators",
    "contribution",
    "detect",
    "edge_labels",
    "evaluate",
    "in_edges",
    "proximal_steps",
    "robust_zscores",
    "roc_auc",
]
