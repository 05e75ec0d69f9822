"""Applications of DICE influence: anomaly detection (and, later, collaborator selection and
contribution accounting). Apps compose the core; they import no CLI or plotting code."""

from dicejax.apps import anomaly
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
    "detect",
    "edge_labels",
    "evaluate",
    "in_edges",
    "proximal_steps",
    "robust_zscores",
    "roc_auc",
]
