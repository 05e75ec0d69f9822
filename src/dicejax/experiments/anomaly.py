"""Anomaly detection by proximal influence, the DICE paper's setting, with detection rates.

The paper (its Figure 4) shows that a neighbour with corrupted data — labels randomly
permuted within each batch, or inputs drowned in Gaussian noise of variance 100 — has an
abnormal proximal influence on the nodes it sends to, on Fashion-MNIST with a 32-node
exponential graph (5 in-neighbours per node, one of them anomalous). It gives no detection
rate. :func:`detection` runs that setting for several seeds and reports ROC-AUC, precision
and recall of the rule in :mod:`dicejax.apps.anomaly`.

Each seed: build the run (:func:`dicejax.experiments.common.build`), corrupt the attackers'
batches at every step as they are streamed (:class:`AttackedSource`; or gate their updates,
for update attacks), train ``T − window`` steps without recording, then the last ``window``
steps recorded in chunks of ``chunk_steps`` (memory: ``O(chunk_steps · n · P)`` and one
chunk of batches, whatever ``T`` is), summing the weight-normalised proximal influence of
every step; finally every node scores its in-neighbours and flags outliers.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import attacks
from dicejax.apps import anomaly
from dicejax.experiments.common import (
    ResultStore,
    RunConfig,
    Runner,
    Setup,
    build,
    cached_optimizer,
    evaluate_params,
    periodic_window,
    pick_attackers,
    summarize,
)

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
    batches = setup.batches  # materialised once: [T, n, B, ...]
    T, n = jax.tree.leaves(batches)[0].shape[:2]
    if attack in DATA_ATTACKS:
        mask = attacks.attack_mask(T, n, list(attackers))
        return jax.jit(corruption)(batches, mask, jax.random.PRNGKey(seed)), None
    dtype = jnp.result_type(jax.tree.leaves(setup.params)[0])
    return batches, attacks.UPDATE_ATTACKS[attack](T, n, list(attackers), dtype=dtype)


class AttackedSource(NamedTuple):
    """A batch source whose attackers' batches are corrupted as the chunks are generated.

    ``source(a, b)`` equals steps ``[a, b)`` of :func:`apply_attack`'s corrupted batches for
    ``label_permutation`` and ``label_flip`` (the label-permutation draws ``[T, n, B]`` are
    made once per run, the same draws as corrupting the whole run at once). For
    ``gaussian_noise`` the noise of step ``t`` is drawn from ``fold_in(key(seed), t)``, so
    any window is reproducible on its own (not the same draws as :func:`apply_attack`).

    Attributes:
      source: the clean source (e.g. ``Setup.source``).
      attack: a name of :data:`DATA_ATTACKS`.
      attackers: attacking node indices.
      seed: seeds the corruption.
      std: noise standard deviation (``gaussian_noise``).
      target: class of ``label_flip``.
      draws: ``[T, n, B]`` uniform draws of ``label_permutation`` (None otherwise).
    """

    source: Callable[[int, int], dict]
    attack: str
    attackers: tuple[int, ...]
    seed: int
    std: float = 10.0
    target: int = 0
    draws: np.ndarray | None = None

    def __call__(self, start: int, stop: int) -> dict:
        chunk = dict(self.source(start, stop))
        y = np.asarray(chunk["y"])
        mask = np.zeros(y.shape[1], bool)
        mask[list(self.attackers)] = True
        if self.attack == "label_permutation":
            order = np.argsort(self.draws[start:stop], axis=-1, kind="stable")
            permuted = np.take_along_axis(y, order, axis=-1)
            chunk["y"] = np.where(mask[None, :, None], permuted, y)
        elif self.attack == "label_flip":
            chunk["y"] = np.where(mask[None, :, None], np.asarray(self.target, y.dtype), y)
        elif self.attack == "gaussian_noise":
            chunk["x"] = np.asarray(_noisy(jax.numpy.asarray(chunk["x"]), jnp.asarray(mask),
                                           jnp.arange(start, stop), self.seed, self.std))
        return chunk

    def spec(self) -> dict:
        """JSON description for a checkpoint's ``run.json``."""
        spec = getattr(self.source, "spec", None)
        base = spec() if callable(spec) else {"kind": "callable"}
        return {**base, "attack": {"name": self.attack, "attackers": list(self.attackers),
                                   "seed": self.seed, "std": self.std, "target": self.target}}


@jax.jit
def _noisy(x: jax.Array, mask: jax.Array, steps: jax.Array, seed: int, std: float) -> jax.Array:
    """``x [S, n, B, ...]`` plus ``std · N(0, 1)`` on the masked nodes, drawn per global step."""
    key = jax.random.PRNGKey(seed)

    def one(x_t, t):
        noise = jax.random.normal(jax.random.fold_in(key, t), x_t.shape, x_t.dtype)
        m = mask.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.where(m, x_t + noise * jnp.asarray(std, x_t.dtype), x_t)

    return jax.vmap(one)(x, steps)


def attacked_stream(setup: Setup, attack: str, attackers: Sequence[int], seed: int, *,
                    std: float = 10.0, target: int = 0) -> tuple[Any, np.ndarray | None]:
    """The attacked run as a stream: ``(source, update_scale)``.

    Args:
      setup: the built run.
      attack: one of :data:`ATTACKS`.
      attackers: the attacking node indices.
      seed: seeds the corruption.
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.

    Returns:
      An :class:`AttackedSource` (data attacks; ``update_scale`` None) or the clean source
      and ``[T, n]`` gates (update attacks).
    """
    T, n, B = setup.config.steps, setup.config.nodes, setup.config.batch
    if attack in DATA_ATTACKS:
        corruption_for(attack, std, target)  # validates std and target
        draws = None
        if attack == "label_permutation":  # the draws of attacks.label_permutation()
            draws = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (T, n, B)))
        return AttackedSource(setup.source, attack, tuple(int(a) for a in attackers), int(seed),
                              float(std), int(target), draws), None
    if attack not in ATTACKS:
        raise ValueError(f"attack: must be one of {ATTACKS}, got {attack!r}")
    dtype = jnp.result_type(jax.tree.leaves(setup.params)[0])
    scale = attacks.UPDATE_ATTACKS[attack](T, n, list(attackers), dtype=dtype)
    return setup.source, np.asarray(scale)




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
    progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    statistic: str = "sum",
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
      progress: called after each chunk of steps with ``(seed index, steps done)``.
      checkpoint_dir: keep every finished seed there (and, for data attacks, the training
        checkpoints of the seed in progress); a second call with the same folder resumes.
      statistic: what each edge is scored by before the robust z-score: ``"sum"`` the
        accumulated influence, ``"t"`` its mean over standard error across the window's
        steps (:func:`dicejax.apps.anomaly.t_statistic`).

    Returns:
      A JSON-ready dict: the settings, ``per_seed`` (attackers, ROC-AUC, precision, recall,
      precision and recall of the combined detector (:func:`dicejax.apps.anomaly.classify`:
      also low-effort and outsized updates) and the attack type it suspects per flagged node,
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
    if statistic not in ("sum", "t"):
        raise ValueError(f"statistic: must be 'sum' or 't', got {statistic!r}")
    corruption_for(attack, std, target)  # validates std and target before any work
    pick_attackers(attackers, config.nodes, 0)  # validate before any work

    # One optimizer object for every seed (and call): it is a static argument of the jitted
    # run, so a fresh one per seed would recompile everything.
    optimizer = cached_optimizer(config.optimizer, config.lr)
    store = None
    if checkpoint_dir is not None:
        store = ResultStore(checkpoint_dir, {
            "experiment": "detection", "config": dataclasses.asdict(config), "attack": attack,
            "attackers": attackers, "window": window, "threshold": threshold, "std": std,
            "target": target, "min_scale": min_scale, "normalize": normalize,
            "dtype": None if dtype is None else np.dtype(dtype).name,
            **({} if statistic == "sum" else {"statistic": statistic})})
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(seeds):
        result = None if store is None else store.get(f"seed_{int(seed)}")
        if result is None:
            result = _one_seed(
                dataclasses.replace(config, seed=int(seed)), attack, attackers, window,
                threshold, min_scale, normalize, chunk_steps, dtype, optimizer, std=std,
                target=target, statistic=statistic,
                checkpoint_dir=None if store is None else store.subfolder(f"train_{seed}"),
                progress=None if progress is None else (lambda done, i=i: progress(i, done)))
            if store is not None:
                store.put(f"seed_{int(seed)}", result)
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
        "statistic": statistic,
        "seeds": seeds,
        "per_seed": per_seed,
        "roc_auc": summarize([r["roc_auc"] for r in per_seed]),
        "precision": summarize([r["precision"] for r in per_seed]),
        "recall": summarize([r["recall"] for r in per_seed]),
        "top1": summarize([r["top1"] for r in per_seed]),
        "combined_precision": summarize([r.get("combined_precision", float("nan"))
                                         for r in per_seed]),
        "combined_recall": summarize([r.get("combined_recall", float("nan"))
                                      for r in per_seed]),
        "honest_accuracy": summarize([r["honest_accuracy"] for r in per_seed]),
        "wall_seconds": time.perf_counter() - start,
    }


def _one_seed(config: RunConfig, attack: str, attackers, window: int, threshold: float,
              min_scale: float, normalize: bool, chunk_steps: int, dtype: Any, optimizer, *,
              std: float, target: int, statistic: str = "sum", checkpoint_dir=None,
              progress=None) -> dict:
    from sklearn.metrics import roc_curve

    tic = time.perf_counter()
    setup = build(config, dtype)._replace(optimizer=optimizer)
    T, n = config.steps, config.nodes
    chosen = pick_attackers(attackers, n, config.seed)
    source, scale = attacked_stream(setup, attack, chosen, config.seed, std=std, target=target)
    runner = Runner(setup, source=source, update_scale=scale, evaluate=False,
                    checkpoint_dir=checkpoint_dir if scale is None else None,
                    callback=None if progress is None else (lambda state, done: progress(done)))
    runner.advance(T - window)
    total, square, support, count, norm_sum = None, None, None, 0, 0.0
    while runner.position < T:
        traj = periodic_window(runner.record(min(runner.position + chunk_steps, T), move=True))
        prox = anomaly.proximal_steps(setup.loss_fn, traj, setup.probe)
        mats = traj.matrices()
        part = anomaly.accumulate(prox, mats, normalize)
        sq = anomaly.accumulate_squares(prox, mats, normalize)
        edges = anomaly.in_edges(mats)
        total = part if total is None else total + part
        square = sq if square is None else square + sq
        count += prox.shape[0]
        norm_sum = norm_sum + np.asarray(anomaly.update_norms(traj), np.float64).sum(axis=0)
        support = edges if support is None else support | edges
        del traj, prox
    state = runner.state
    scores = total if statistic == "sum" else anomaly.t_statistic(total, square, count)
    det = anomaly.detect(scores, support, threshold, min_scale)
    metrics = anomaly.evaluate(det, chosen)
    suspicion = anomaly.classify(det, norm_sum / count)
    combined = anomaly.evaluate(det, chosen, suspicion.flagged)
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
        "combined_precision": combined.precision,
        "combined_recall": combined.recall,
        "suspected": {str(j): kind for j, kind in suspicion.suspected().items()},
        "relative_norm": np.asarray(suspicion.relative_norm, np.float64),
        "scores": np.where(edges, np.asarray(det.scores, np.float64), np.nan),
        "influence": np.asarray(det.influence, np.float64),
        "roc": {"fpr": fpr, "tpr": tpr},
        "honest_accuracy": float(np.asarray(acc["accuracy"])[honest].mean()),
        "wall_seconds": time.perf_counter() - tic,
    }


def strength_curve(
    config: RunConfig,
    stds: Sequence[float],
    attackers: int | Sequence[int] | None = None,
    window: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    threshold: float = 3.5,
    *,
    statistic: str = "sum",
    chunk_steps: int = 25,
    dtype: Any = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Detection quality against the strength of Gaussian input noise.

    One :func:`detection` of ``gaussian_noise`` per standard deviation, with the same seeds
    (hence the same attackers, partitions and initialisations): where the noise becomes too
    weak to be flagged, and how much it costs the honest nodes there.

    Args:
      config, attackers, window, seeds, threshold, statistic, chunk_steps, dtype: as in
        :func:`detection`.
      stds: ``[K]`` noise standard deviations (positive, finite), e.g. ``(1, 3, 10, 30)``.
      callback: called after each strength with ``(index, its detection result)``.
      progress: called with ``(strength index, seed index, steps done)``.
      checkpoint_dir: keeps every finished seed of every strength (a subfolder per
        strength); a second call with the same folder resumes.

    Returns:
      A JSON-ready dict: ``stds``, ``seeds``, the settings, and ``points``: the
      :func:`detection` result of each strength (``roc_auc``, ``precision``, ``recall``,
      ``combined_precision``, ``combined_recall``, ``honest_accuracy`` summarised over
      seeds, and the per-seed results), plus the total wall time.
    """
    try:
        values = [float(x) for x in stds]
    except (TypeError, ValueError) as e:
        raise ValueError(f"stds: must be a sequence of positive numbers, got {stds!r}") from e
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"stds: must be a non-empty sequence of positive finite numbers, "
                         f"got {stds!r}")
    start = time.perf_counter()
    points = []
    for i, std in enumerate(values):
        sub = None if checkpoint_dir is None else os.path.join(checkpoint_dir, f"std_{std:g}")
        point = detection(
            config, "gaussian_noise", attackers, window, seeds, threshold, std=std,
            chunk_steps=chunk_steps, dtype=dtype, checkpoint_dir=sub, statistic=statistic,
            progress=None if progress is None else (
                lambda seed, done, i=i: progress(i, seed, done)))
        points.append(point)
        if callback is not None:
            callback(i, point)
    return {"config": config, "attack": "gaussian_noise", "stds": values,
            "seeds": list(seeds), "window": window, "threshold": threshold,
            "statistic": statistic, "points": points,
            "wall_seconds": time.perf_counter() - start}


__all__ = ["ATTACKS", "DATA_ATTACKS", "UPDATE_ATTACKS", "AttackedSource", "apply_attack",
           "attacked_stream", "corruption_for", "detection", "strength_curve"]
