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
from dicejax.influence.ledger import Ledger, ledger, per_sample, trajectory_attribution
from dicejax.influence.proximal import (
    neighbourhood_factor,
    proximal,
    proximal_steps,
    reciprocity,
)
from dicejax.influence.rollout import shells

__all__ = [
    "Cascade",
    "Ledger",
    "dice_e",
    "dice_e_network",
    "dice_gt",
    "dice_gt_network",
    "e_cascade",
    "gt_cascade",
    "ledger",
    "neighbourhood_factor",
    "per_sample",
    "proximal",
    "proximal_steps",
    "reciprocity",
    "shells",
    "trajectory_attribution",
]
