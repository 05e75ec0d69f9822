"""Influence alignment: DICE-GT against every DICE-E estimator, for r = 1..R hops.

Trains a network (recording the trajectory), scores many (source node, step) pairs with the
exact counterfactual and with each estimator, and reports Pearson and Spearman correlations
per hop count, and for the network-level reading at each horizon.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dicejax.experiments.common import RunConfig
from dicejax.experiments.train import train
from dicejax.influence import e_cascade, gt_cascade

# name -> (order, direct term): the paper's estimator is E1 with the Taylor direct term.
ESTIMATORS = {
    "E1 (paper)": (1, "taylor"),
    "E1 + exact direct": (1, "exact"),
    "E2": (2, "taylor"),
    "E2 + exact direct": (2, "exact"),
}


def _corr(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"pearson": float(stats.pearsonr(x, y)[0]),
            "spearman": float(stats.spearmanr(x, y)[0])}


def alignment(config: RunConfig, *, hops: int = 3, num_steps: int = 20,
              dtype: Any = jnp.float64, batch_size: int | None = None) -> dict:
    """Scores ``num_steps × n`` (step, source) pairs with DICE-GT and every estimator.

    Args:
      config: the training run.
      hops: largest ``r``; every ``r = 1..hops`` is reported (one ``hops``-step cascade per
        step contains all shorter ones).
      num_steps: number of source steps, evenly spaced over ``[0, T − hops]``.
      dtype: float dtype of the run (float64 by default, so that far-hop ground truths are
        not drowned in float32 rounding; needs ``jax_enable_x64``).
      batch_size: sources re-run at a time (bounds memory).

    Returns:
      A dict with the training summary, the scored steps, per-estimator correlations per
      ``r`` (``"shells"``) and per horizon (``"network"``), the direct-term diagnostic, and
      the raw scores ``{"gt": [R, S, n], name: [R, S, n]}`` for plotting.
    """
    if not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops: must be a positive integer, got {hops!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    if config.steps < hops:
        raise ValueError(f"hops: {hops} exceeds the run's {config.steps} steps")
    res = train(config, record=True, dtype=dtype)
    traj, setup = res.traj, res.setup
    steps = np.unique(np.linspace(0, config.steps - hops, num_steps).round().astype(int))
    loss, probe = setup.loss_fn, setup.probe
    shells = {name: [] for name in ["gt", *ESTIMATORS]}
    network = {name: [] for name in ["gt", *ESTIMATORS]}
    directs = {"taylor": [], "exact": []}
    start = time.perf_counter()
    for t in steps:
        t = int(t)
        gt = gt_cascade(loss, traj, probe, t, hops, batch_size=batch_size)
        est = {o: e_cascade(loss, traj, probe, t, hops, order=o, batch_size=batch_size)
               for o in (1, 2)}
        shells["gt"].append(gt.direct + jnp.cumsum(gt.per_hop, axis=0))
        network["gt"].append(jnp.sum(gt.matrix, axis=1))
        for name, (order, direct) in ESTIMATORS.items():
            cas = est[order]
            own = gt.direct if direct == "exact" else cas.direct
            shells[name].append(own + jnp.cumsum(cas.per_hop, axis=0))
            network[name].append(jnp.sum(cas.matrix, axis=1))
        directs["taylor"].append(est[1].direct)
        directs["exact"].append(gt.direct)
    jax.block_until_ready(shells["gt"][-1])
    seconds = time.perf_counter() - start
    # [R, S, n]
    scores = {k: np.stack([np.asarray(x) for x in v], axis=1) for k, v in shells.items()}
    nets = {k: np.stack([np.asarray(x) for x in v], axis=1) for k, v in network.items()}
    table = {name: {r: _corr(scores["gt"][r - 1].ravel(), scores[name][r - 1].ravel())
                    for r in range(1, hops + 1)} for name in ESTIMATORS}
    net_table = {name: {h: _corr(nets["gt"][h - 1].ravel(), nets[name][h - 1].ravel())
                        for h in range(1, hops + 1)}
                 for name in ("E1 (paper)", "E2")}
    d_t, d_e = (np.concatenate([np.asarray(x) for x in directs[k]]) for k in ("taylor", "exact"))
    return {
        "train": res.summary,
        "steps": steps,
        "pairs_per_hop": int(scores["gt"][0].size),
        "shells": table,
        "network": net_table,
        "direct_taylor_vs_exact": _corr(d_e, d_t),
        "scoring_seconds": seconds,
        "scores": scores,
        "network_scores": nets,
    }
