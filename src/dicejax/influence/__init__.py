"""DICE influence: ground truth and estimates for any number of hops, every source at once.

Influence scores are changes in probe loss ``L(·; z')`` caused by a node's local update
(its data) at one step; negative means the data helped.

Conventions shared by every function here: the argument order is ``(loss_fn, traj, probe,
[step], [hops], node_weights, *, options)``; ``step`` (and ``start``/``stop``) are *local*
indices into the trajectory (``0 <= step < T``); ``hops`` is the number of later steps a
score follows the source's update (``horizon`` is its deprecated name).
"""

from dicejax.influence.cascade import (
    Cascade,
    Plan,
    SparseCascade,
    dice_e,
    dice_e_network,
    dice_gt,
    dice_gt_network,
    e_cascade,
    gt_cascade,
    plan_cascade,
)
from dicejax.influence.ledger import (
    Ledger,
    dice_e_per_sample,
    ledger,
    per_sample,
    trajectory_attribution,
)
from dicejax.influence.proximal import (
    neighbourhood_factor,
    proximal,
    proximal_steps,
    reciprocity,
)
from dicejax.influence.rerun import shells

__all__ = [
    "Cascade",
    "Ledger",
    "Plan",
    "SparseCascade",
    "dice_e",
    "dice_e_network",
    "dice_e_per_sample",
    "dice_gt",
    "dice_gt_network",
    "e_cascade",
    "gt_cascade",
    "ledger",
    "neighbourhood_factor",
    "per_sample",
    "plan_cascade",
    "proximal",
    "proximal_steps",
    "reciprocity",
    "shells",
    "trajectory_attribution",
]
