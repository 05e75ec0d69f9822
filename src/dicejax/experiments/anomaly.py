"""Anomaly detection by proximal influence, the DICE paper's setting, with detection rates.

The paper (its Figure 4) shows that a neighbour with corrupted data — labels randomly
permuted within each batch, or inputs drowned in Gaussian noise of variance 100 — has an
abnormal proximal influence on the nodes it sends to, on Fashion-MNIST with a 32-node
exponential graph (5 in-neighbours per node, one of them anomalous). It gives no detection
rate. :func:`detection` runs that setting for several seeds and reports ROC-AUC, precision
and recall of the rule in :mod:`dicejax.apps.anomaly`.

Each seed: build the run (:func:`dicejax.experiments.common.build`), corrupt the attackers'
batches at every step (or gate their updates, for update attacks), train ``T − window``
steps without recording, then the last ``window`` steps recorded in chunks of
``chunk_steps`` (memory: ``O(chunk_steps · n · P)``), summing the weight-normalised proximal
influence of every step; finally every node scores its in-neighbours and flags outliers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import attacks
from dicejax.apps import anomaly
from dicejax.experiments.common import (
    RunConfig,
    Setup,
    build,
    cached_optimizer,
    evaluate_params,
    pick_attackers,
    summarize,
)
from dicejax.simulate import plan_run

DATA_ATTACKS = ("label_permutation", "label_flip", "gaussian_noise")
UPDATE_ATTACKS = ("sign_flip", "free_rider")
ATTACKS = DATA_ATTACKS + UPDATE_ATTACKS


def corruption_for(attack: str, std: float = 10.0, target: int = 0) -> attacks.Corruption | None:
    """The batch corruption of a data attack (``None`` for update attacks).

    Args:
      attack: one of :data:`ATTACKS`.
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack: must be one of {ATTACKS}, got {attack!r}")
    if attack == "gaussian_noise":
        return attacks.gaussian_noise(std)
    if attack == "label_flip":
        return attacks.label_flip(target)
    if attack == "label_permutation":
        return attacks.label_permutation()
    return None


def apply_attack(setup: Setup, attack: str, corruption: attacks.Corruption | None,
                 attackers: Sequence[int], seed: int) -> tuple[Any, jax.Array | None]:
    """The attacked run's batches and update gates.

    Args:
      setup: the built run (its ``batches`` are ``[T, n, B, ...]``).
      attack: one of :data:`ATTACKS`.
      corruption: :func:`corruption_for` ``(attack)``.
      attackers: the attacking node indices.
      seed: seeds the corruption.

    Returns:
      ``(batches, update_scale)``: corrupted batches for a data attack (``update_scale``
      ``None``), or the clean batches and ``[T, n]`` gates for an update attack.
    """
    T, n = jax.tree.leaves(setup.batches)[0].shape[:2]
    if attack in DATA_ATTACKS:
        mask = attacks.attack_mask(T, n, list(attackers))
        return jax.jit(corruption)(setup.batches, mask, jax.random.PRNGKey(seed)), None
    dtype = jnp.result_type(jax.tree.leaves(setup.params)[0])
    return setup.batches, attacks.UPDATE_ATTACKS[attack](T, n, list(attackers), dtype=dtype)


def detection(
    config: RunConfig,
    attack: str = "label_permutation",
    attackers: int | Sequence[int] | None = None,
    window: int = 100,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    threshold: float = 3.5,
    *,
    std: float = 10.0,
    target: int = 0,
    min_scale: float = 0.25,
    normalize: bool = True,
    chunk_steps: int = 25,
    dtype: Any = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Runs anomaly detection for several seeds and reports its quality.

    Args:
      config: the run (``config.seed`` is replaced by each seed). The paper's setting:
        ``RunConfig(dataset="fashion_mnist", nodes=32, topology="exponential", model="mlp",
        lr=0.1, batch=16, samples_per_node=512)``.
      attack: ``label_permutation`` (the paper's label flipping), ``label_flip`` (all labels
        to ``target``), ``gaussian_noise`` (input noise of std ``std``; the paper's variance
        100 is ``std=10``), ``sign_flip`` or ``free_rider`` (update gates).
      attackers: node indices attacking in every seed, or a count of attackers drawn at
        random per seed (default: one random attacker per seed).
      window: score the last ``window`` steps of the run (``1 <= window <= config.steps``).
      seeds: seeds of data order, partition, initialisation, corruption and attackers.
      threshold: flag robust z-scores above this (see :func:`dicejax.apps.anomaly.detect`).
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.
      min_scale: scale floor of the robust z-score (see
        :func:`dicejax.apps.anomaly.robust_zscores`).
      normalize: divide proximal influence by the mixing weight.
      chunk_steps: recorded steps held in memory at once.
      dtype: float dtype (default float32).
      callback: called after each seed with ``(index, per-seed result)``.

    Returns:
      A JSON-ready dict: the settings, ``per_seed`` (attackers, ROC-AUC, precision, recall,
      top-1 rate, flagged in-neighbours of every node, edge scores ``[n, n]`` with ``None``
      off the edges, the ROC curve, honest nodes' mean test accuracy, wall seconds), and
      ``roc_auc``, ``precision``, ``recall``, ``top1`` summarised over seeds (mean, std,
      min, max), plus the total wall time.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack: must be one of {ATTACKS}, got {attack!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= config.steps:
        raise ValueError(f"window: must be an integer in [1, steps={config.steps}], got {window!r}")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int | np.integer) for s in seeds):
        raise ValueError(f"seeds: must be a non-empty sequence of integers, got {seeds!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: must be a finite number, got {threshold!r}")
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
        raise ValueError(f"chunk_steps: must be a positive integer, got {chunk_steps!r}")
    corruption = corruption_for(attack, std, target)
    pick_attackers(attackers, config.nodes, 0)  # validate before any work

    # One optimizer object for every seed (and call): it is a static argument of the jitted
    # run, so a fresh one per seed would recompile everything.
    optimizer = cached_optimizer(config.optimizer, config.lr)
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(seeds):
        result = _one_seed(dataclasses.replace(config, seed=int(seed)), attack, corruption,
                           attackers, window, threshold, min_scale, normalize, chunk_steps,
                           dtype, optimizer)
        per_seed.append(result)
        if callback is not None:
            callback(i, result)
    return {
        "config": config,
        "attack": attack,
        "std": std if attack == "gaussian_noise" else None,
        "target": target if attack == "label_flip" else None,
        "window": window,
        "threshold": threshold,
        "min_scale": min_scale,
        "normalize": normalize,
        "seeds": seeds,
        "per_seed": per_seed,
        "roc_auc": summarize([r["roc_auc"] for r in per_seed]),
        "precision": summarize([r["precision"] for r in per_seed]),
        "recall": summarize([r["recall"] for r in per_seed]),
        "top1": summarize([r["top1"] for r in per_seed]),
        "honest_accuracy": summarize([r["honest_accuracy"] for r in per_seed]),
        "wall_seconds": time.perf_counter() - start,
    }


def _one_seed(config: RunConfig, attack: str, corruption: attacks.Corruption,
              attackers, window: int, threshold: float, min_scale: float, normalize: bool,
              chunk_steps: int, dtype: Any, optimizer) -> dict:
    from sklearn.metrics import roc_curve

    tic = time.perf_counter()
    setup = build(config, dtype)._replace(optimizer=optimizer)
    T, n = config.steps, config.nodes
    chosen = pick_attackers(attackers, n, config.seed)
    batches, scale = apply_attack(setup, attack, corruption, chosen, config.seed)

    plan = plan_run(setup.loss_fn, setup.params, batches, setup.topology, setup.optimizer,
                    update_scale=scale)
    warm, state = T - window, plan.run_state
    if warm:
        state, _ = plan.run_window(state, batches, 0, warm)
    total, support = None, None
    for lo in range(warm, T, chunk_steps):
        hi = min(lo + chunk_steps, T)
        state, traj = plan.run_window(state, batches, lo, hi, record=True)
        prox = anomaly.proximal_steps(setup.loss_fn, traj, setup.probe)
        mats = traj.matrices()
        part = anomaly.accumulate(prox, mats, normalize)
        edges = anomaly.in_edges(mats)
        total = part if total is None else total + part
        support = edges if support is None else support | edges
        del traj, prox
    det = anomaly.detect(total, support, threshold, min_scale)
    metrics = anomaly.evaluate(det, chosen)
    edges = np.asarray(det.edges)
    labels = anomaly.edge_labels(edges, chosen)
    scores = np.nan_to_num(np.asarray(det.scores, np.float64), posinf=np.finfo(float).max,
                           neginf=-np.finfo(float).max)
    fpr, tpr, _ = roc_curve(labels[edges], scores[edges])
    acc = evaluate_params(setup.eval_fn, state.params, setup.test)
    honest = np.setdiff1d(np.arange(n), chosen)
    return {
        "seed": config.seed,
        "attackers": chosen,
        **metrics._asdict(),
        "flagged": det.flagged_neighbours(),
        "scores": np.where(edges, np.asarray(det.scores, np.float64), np.nan),
        "influence": np.asarray(det.influence, np.float64),
        "roc": {"fpr": fpr, "tpr": tpr},
        "honest_accuracy": float(np.asarray(acc["accuracy"])[honest].mean()),
        "wall_seconds": time.perf_counter() - tic,
    }


__all__ = ["ATTACKS", "DATA_ATTACKS", "UPDATE_ATTACKS", "apply_attack", "corruption_for",
           "detection"]
