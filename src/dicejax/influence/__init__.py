"""DICE influence: ground truth and estimates for any number of hops, every source at once.

Influence scores are changes in probe loss ``L(·; z')`` caused by a node's local update
(its data) at one step; negative means the data helped.
"""

from dicejax.influence.cascade import (
    Cascade,
    dice_e,
    dice_e_network,
    dice_gt,
    dice_gt_network,
    e_cascade,
    gt_cascade,
)
from dicejax.influence.proximal import neighbourhood_factor, proximal, reciprocity
from dicejax.influence.rollout import gate, rollout, shells

__all__ = [
    "Cascade",
    "dice_e",
    "dice_e_network",
    "dice_gt",
    "dice_gt_network",
    "e_cascade",
    "gate",
    "gt_cascade",
    "neighbourhood_factor",
    "proximal",
    "reciprocity",
    "rollout",
    "shells",
]
