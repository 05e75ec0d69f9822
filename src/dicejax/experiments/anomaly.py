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

**Adaptive attackers** (:func:`detection`'s ``fraction``, ``on``, ``off``): ``label_noise``
mislabels only ``round(fraction · B)`` examples of each attacked batch
(:func:`dicejax.attacks.label_noise`), and any attack can be intermittent, corrupt (or
manipulated) for ``on`` steps then honest for ``off`` steps
(:func:`dicejax.attacks.alternating_steps`). :func:`strength_curve` sweeps the noise standard
deviation, the label-noise fraction, or the duty cycle ``on / (on + off)``.
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
PARTIAL_ATTACKS = ("label_noise",)
"""Data attacks that corrupt only part of each batch (a ``fraction`` of its labels)."""
DETECTION_ATTACKS = ATTACKS + PARTIAL_ATTACKS
"""What :func:`detection`, :func:`attacked_stream` and :func:`apply_attack` take: every
attack of :data:`ATTACKS` and the partial ones (:data:`PARTIAL_ATTACKS`)."""
SWEEPS = ("std", "fraction", "duty")
"""What :func:`strength_curve` sweeps: the ``gaussian_noise`` standard deviation, the
``label_noise`` fraction, or the duty cycle ``on / (on + off)`` of an intermittent attacker."""


def _is_data_attack(attack: str) -> bool:
    return attack in DATA_ATTACKS or attack in PARTIAL_ATTACKS


def intermittent_steps(T: int, on: int = 1, off: int = 0, phase: int = 0) -> tuple[int, ...] | None:
    """The attacked steps of an attacker with duty cycle ``on / (on + off)``.

    Args:
      T: number of steps.
      on: attacked steps per period (positive).
      off: honest steps per period (non-negative; 0 = attacks every step).
      phase: the step at which an attacked block starts.

    Returns:
      ``None`` for ``off = 0`` (every step, as :func:`dicejax.attacks.attack_mask` reads
      it), else :func:`dicejax.attacks.alternating_steps` ``(T, on, off, phase)``.

    Raises:
      ValueError: naming ``T``, ``on``, ``off`` or ``phase`` when malformed.
    """
    steps = attacks.alternating_steps(T, on, off, phase)  # validates every argument
    return None if off == 0 else steps


def duty_off(duty: float, on: int = 1) -> int:
    """The honest steps per period of an attacker on ``on`` steps with duty cycle ``duty``.

    The period is ``round(on / duty)`` steps, so ``off = round(on / duty) − on`` and the
    realised duty ``on / (on + off)`` equals ``duty`` where ``on / duty`` is an integer
    (``on = 1``: duties 1, 1/2, 1/3, ...; e.g. 0.1 → off 9).

    Args:
      duty: the share of steps attacked, in ``(0, 1]``.
      on: attacked steps per period (positive).

    Returns:
      ``off`` (non-negative; 0 for ``duty = 1``).

    Raises:
      ValueError: naming ``duty`` or ``on``.
    """
    if isinstance(on, bool) or not isinstance(on, int | np.integer) or on < 1:
        raise ValueError(f"on: must be a positive integer, got {on!r}")
    if isinstance(duty, bool) or not isinstance(duty, int | float | np.floating | np.integer) \
            or not (np.isfinite(duty) and 0 < duty <= 1):
        raise ValueError(f"duty: must be a number in (0, 1], got {duty!r}")
    return round(on / float(duty)) - int(on)


def corruption_for(attack: str, std: float = 10.0, target: int = 0, fraction: float = 0.5,
                   num_classes: int = 10) -> attacks.Corruption | None:
    """The batch corruption of a data attack (``None`` for update attacks).

    Args:
      attack: one of :data:`DETECTION_ATTACKS`.
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.
      fraction: share of each attacked batch mislabelled by ``label_noise``, in ``(0, 1]``.
      num_classes: number of classes for ``label_noise`` (10 for every bundled data set).

    Raises:
      ValueError: naming ``attack``, ``std``, ``target``, ``fraction`` or ``num_classes``.
    """
    if attack not in DETECTION_ATTACKS:
        raise ValueError(f"attack: must be one of {DETECTION_ATTACKS}, got {attack!r}")
    if attack == "label_noise":
        corruption = attacks.label_noise(fraction, num_classes)  # fraction in [0, 1]
        if fraction == 0:
            raise ValueError("fraction: must be in (0, 1] for an attack, got 0 (no label "
                             "would change)")
        return corruption
    if attack == "gaussian_noise":
        return attacks.gaussian_noise(std)
    if attack == "label_flip":
        return attacks.label_flip(target)
    if attack == "label_permutation":
        return attacks.label_permutation()
    return None


def apply_attack(setup: Setup, attack: str, corruption: attacks.Corruption | None,
                 attackers: Sequence[int], seed: int, *, on: int = 1, off: int = 0,
                 phase: int = 0) -> tuple[Any, jax.Array | None]:
    """The attacked run's batches and update gates.

    Args:
      setup: the built run (its ``batches`` are ``[T, n, B, ...]``).
      attack: one of :data:`DETECTION_ATTACKS`.
      corruption: :func:`corruption_for` ``(attack)``.
      attackers: the attacking node indices.
      seed: seeds the corruption.
      on, off, phase: an intermittent attacker attacks the steps
        :func:`intermittent_steps` ``(T, on, off, phase)`` (default: every step).

    Returns:
      ``(batches, update_scale)``: corrupted batches for a data attack (``update_scale``
      ``None``), or the clean batches and ``[T, n]`` gates for an update attack.
    """
    batches = setup.batches  # materialised once: [T, n, B, ...]
    T, n = jax.tree.leaves(batches)[0].shape[:2]
    steps = intermittent_steps(T, on, off, phase)
    if _is_data_attack(attack):
        mask = attacks.attack_mask(T, n, list(attackers), steps)
        return jax.jit(corruption)(batches, mask, jax.random.PRNGKey(seed)), None
    dtype = jnp.result_type(jax.tree.leaves(setup.params)[0])
    return batches, attacks.UPDATE_ATTACKS[attack](T, n, list(attackers), steps, dtype=dtype)


class AttackedSource(NamedTuple):
    """A batch source whose attackers' batches are corrupted as the chunks are generated.

    ``source(a, b)`` equals steps ``[a, b)`` of :func:`apply_attack`'s corrupted batches for
    ``label_permutation``, ``label_flip`` and ``label_noise`` (the draws ``[T, n, B]`` are
    made once per run, the same draws as corrupting the whole run at once, so any chunking
    gives the same batches). For ``gaussian_noise`` the noise of step ``t`` is drawn from
    ``fold_in(key(seed), t)``, so any window is reproducible on its own (not the same draws
    as :func:`apply_attack`). An intermittent attacker (``off > 0``) corrupts only the steps
    of :func:`dicejax.attacks.alternating_steps` ``(T, on, off, phase)``; the draws of the
    other steps are made and not used, so the attacked steps get the batches an always-on
    attacker would.

    Attributes:
      source: the clean source (e.g. ``Setup.source``).
      attack: a data attack: a name of :data:`DATA_ATTACKS` or :data:`PARTIAL_ATTACKS`.
      attackers: attacking node indices.
      seed: seeds the corruption.
      std: noise standard deviation (``gaussian_noise``).
      target: class of ``label_flip``.
      draws: ``[T, n, B]`` uniform draws of ``label_permutation`` and ``label_noise`` (the
        order of each batch; None otherwise).
      fraction: share of each attacked batch that ``label_noise`` mislabels.
      num_classes: number of classes (``label_noise``).
      offsets: ``[T, n, B]`` integers in ``[1, num_classes)`` that ``label_noise`` adds to the
        chosen labels, modulo ``num_classes`` (None otherwise).
      on: attacked steps per period.
      off: honest steps per period (0: every step attacked).
      phase: the step at which an attacked block starts.
    """

    source: Callable[[int, int], dict]
    attack: str
    attackers: tuple[int, ...]
    seed: int
    std: float = 10.0
    target: int = 0
    draws: np.ndarray | None = None
    fraction: float = 0.5
    num_classes: int = 10
    offsets: np.ndarray | None = None
    on: int = 1
    off: int = 0
    phase: int = 0

    def step_mask(self, start: int, stop: int, n: int) -> np.ndarray:
        """``[stop − start, n]`` bool: which (step, node) entries of steps ``[start, stop)``
        are attacked."""
        rows = np.ones(stop - start, bool)
        if self.off > 0 and stop > start:
            rows = np.isin(np.arange(start, stop),
                           attacks.alternating_steps(stop, self.on, self.off, self.phase))
        cols = np.zeros(n, bool)
        cols[list(self.attackers)] = True
        return rows[:, None] & cols[None, :]

    def __call__(self, start: int, stop: int) -> dict:
        chunk = dict(self.source(start, stop))
        y = np.asarray(chunk["y"])
        mask = self.step_mask(start, stop, y.shape[1])  # [S, n]
        if self.attack == "label_permutation":
            order = np.argsort(self.draws[start:stop], axis=-1, kind="stable")
            permuted = np.take_along_axis(y, order, axis=-1)
            chunk["y"] = np.where(mask[:, :, None], permuted, y)
        elif self.attack == "label_flip":
            chunk["y"] = np.where(mask[:, :, None], np.asarray(self.target, y.dtype), y)
        elif self.attack == "label_noise":  # attacks.label_noise on the whole run's draws
            rank = np.argsort(np.argsort(self.draws[start:stop], axis=-1, kind="stable"),
                              axis=-1, kind="stable")
            wide = np.promote_types(y.dtype, np.int32)
            wrong = ((y.astype(wide) + self.offsets[start:stop]) % self.num_classes)
            noisy = np.where(rank < round(self.fraction * y.shape[-1]), wrong.astype(y.dtype), y)
            chunk["y"] = np.where(mask[:, :, None], noisy, y)
        elif self.attack == "gaussian_noise":
            chunk["x"] = np.asarray(_noisy(jax.numpy.asarray(chunk["x"]), jnp.asarray(mask),
                                           jnp.arange(start, stop), self.seed, self.std))
        return chunk

    def spec(self) -> dict:
        """JSON description for a checkpoint's ``run.json``."""
        spec = getattr(self.source, "spec", None)
        base = spec() if callable(spec) else {"kind": "callable"}
        attack = {"name": self.attack, "attackers": list(self.attackers), "seed": self.seed,
                  "std": self.std, "target": self.target}
        # only the adaptive settings in use are described: the fingerprints of checkpoints
        # written before they existed stay valid
        if self.attack == "label_noise":
            attack.update(fraction=self.fraction, num_classes=self.num_classes)
        if self.off > 0:
            attack.update(on=self.on, off=self.off, phase=self.phase)
        return {**base, "attack": attack}


@jax.jit
def _noisy(x: jax.Array, mask: jax.Array, steps: jax.Array, seed: int, std: float) -> jax.Array:
    """``x [S, n, B, ...]`` plus ``std · N(0, 1)`` where ``mask [S, n]``, drawn per global step."""
    key = jax.random.PRNGKey(seed)

    def one(x_t, m_t, t):
        noise = jax.random.normal(jax.random.fold_in(key, t), x_t.shape, x_t.dtype)
        m = m_t.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.where(m, x_t + noise * jnp.asarray(std, x_t.dtype), x_t)

    return jax.vmap(one)(x, mask, steps)


def attacked_stream(setup: Setup, attack: str, attackers: Sequence[int], seed: int, *,
                    std: float = 10.0, target: int = 0, fraction: float = 0.5, on: int = 1,
                    off: int = 0, phase: int = 0) -> tuple[Any, np.ndarray | None]:
    """The attacked run as a stream: ``(source, update_scale)``.

    Args:
      setup: the built run.
      attack: one of :data:`DETECTION_ATTACKS`.
      attackers: the attacking node indices.
      seed: seeds the corruption.
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.
      fraction: share of each attacked batch mislabelled by ``label_noise``, in ``(0, 1]``
        (the number of classes is the data set's).
      on, off, phase: an intermittent attacker attacks the steps
        :func:`intermittent_steps` ``(T, on, off, phase)`` (default: every step).

    Returns:
      An :class:`AttackedSource` (data attacks; ``update_scale`` None) or the clean source
      and ``[T, n]`` gates (update attacks).

    Raises:
      ValueError: naming ``attack``, ``std``, ``target``, ``fraction``, ``on``, ``off`` or
        ``phase``.
    """
    T, n, B = setup.config.steps, setup.config.nodes, setup.config.batch
    if attack not in DETECTION_ATTACKS:
        raise ValueError(f"attack: must be one of {DETECTION_ATTACKS}, got {attack!r}")
    steps = intermittent_steps(T, on, off, phase)  # validates on, off and phase
    if _is_data_attack(attack):
        num_classes = int(setup.dataset.num_classes)
        corruption_for(attack, std, target, fraction, num_classes)  # validates the settings
        draws = offsets = None
        key = jax.random.PRNGKey(seed)
        if attack == "label_permutation":  # the draws of attacks.label_permutation()
            draws = np.asarray(jax.random.uniform(key, (T, n, B)))
        elif attack == "label_noise":  # the draws of attacks.label_noise(fraction, C)
            position_key, offset_key = jax.random.split(key)
            label_dtype = jnp.asarray(np.asarray(setup.source(0, 1)["y"])).dtype
            draws = np.asarray(jax.random.uniform(position_key, (T, n, B)))
            offsets = np.asarray(jax.random.randint(
                offset_key, (T, n, B), 1, num_classes,
                dtype=jnp.promote_types(label_dtype, jnp.int32)))
        return AttackedSource(setup.source, attack, tuple(int(a) for a in attackers), int(seed),
                              float(std), int(target), draws, float(fraction), num_classes,
                              offsets, int(on), int(off), int(phase)), None
    dtype = jnp.result_type(jax.tree.leaves(setup.params)[0])
    scale = attacks.UPDATE_ATTACKS[attack](T, n, list(attackers), steps, dtype=dtype)
    return setup.source, np.asarray(scale)


def _check_detection(config: RunConfig, attack: str, attackers, window: int, seeds: list,
                     threshold: float, chunk_steps: int, statistic: str, *, std: float,
                     target: int, fraction: float, on: int = 1, off: int = 0,
                     phase: int = 0) -> tuple[int, int | None]:
    """:func:`detection`'s checks before any work: ``(attacked steps scored, mislabelled)``."""
    if attack not in DETECTION_ATTACKS:
        raise ValueError(f"attack: must be one of {DETECTION_ATTACKS}, got {attack!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= config.steps:
        raise ValueError(f"window: must be an integer in [1, steps={config.steps}], got {window!r}")
    if not seeds or not all(isinstance(s, int | np.integer) for s in seeds):
        raise ValueError(f"seeds: must be a non-empty sequence of integers, got {seeds!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: must be a finite number, got {threshold!r}")
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
        raise ValueError(f"chunk_steps: must be a positive integer, got {chunk_steps!r}")
    if statistic not in ("sum", "t"):
        raise ValueError(f"statistic: must be 'sum' or 't', got {statistic!r}")
    corruption_for(attack, std, target, fraction)  # validates std, target, fraction
    scored = intermittent_steps(config.steps, on, off, phase)  # validates on, off, phase
    scored = window if scored is None else sum(s >= config.steps - window for s in scored)
    mislabelled = round(fraction * config.batch) if attack == "label_noise" else None
    if mislabelled == 0:
        raise ValueError(f"fraction: round({fraction:g} · batch {config.batch}) = 0 labels "
                         f"per batch: label_noise would change nothing")
    pick_attackers(attackers, config.nodes, 0)
    return int(scored), mislabelled


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
    fraction: float = 0.5,
    on: int = 1,
    off: int = 0,
    phase: int = 0,
) -> dict:
    """Runs anomaly detection for several seeds and reports its quality.

    Args:
      config: the run (``config.seed`` is replaced by each seed). The paper's setting:
        ``RunConfig(dataset="fashion_mnist", nodes=32, topology="exponential", model="mlp",
        lr=0.1, batch=16, samples_per_node=512)``.
      attack: ``label_permutation`` (the paper's label flipping), ``label_flip`` (all labels
        to ``target``), ``gaussian_noise`` (input noise of std ``std``; the paper's variance
        100 is ``std=10``), ``label_noise`` (``round(fraction · B)`` labels of each attacked
        batch made wrong), ``sign_flip`` or ``free_rider`` (update gates).
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
      fraction: share of each attacked batch that ``label_noise`` mislabels, in ``(0, 1]``;
        ``round(fraction · config.batch)`` must be at least 1.
      on, off, phase: an intermittent attacker (any attack), attacking ``on`` steps then
        honest ``off`` steps from step ``phase`` on (:func:`intermittent_steps`); ``off = 0``
        (the default) attacks every step.

    Returns:
      A JSON-ready dict: the settings (with ``fraction``, ``mislabelled`` ``round(fraction ·
      B)`` for ``label_noise``, ``on``, ``off``, ``phase``, the ``duty`` ``on / (on + off)``
      and ``attacked_steps_scored``, the attacked steps among the last ``window``),
      ``per_seed`` (attackers, ROC-AUC, precision, recall,
      precision and recall of the combined detector (:func:`dicejax.apps.anomaly.classify`:
      also low-effort and outsized updates) and the attack type it suspects per flagged node,
      top-1 rate, flagged in-neighbours of every node, edge scores ``[n, n]`` with ``None``
      off the edges, the ROC curve, honest nodes' mean test accuracy, wall seconds), and
      ``roc_auc``, ``precision``, ``recall``, ``top1`` summarised over seeds (mean, std,
      min, max), plus the total wall time.
    """
    seeds = list(seeds)
    scored, mislabelled = _check_detection(config, attack, attackers, window, seeds, threshold,
                                           chunk_steps, statistic, std=std, target=target,
                                           fraction=fraction, on=on, off=off, phase=phase)
    adaptive = {"fraction": float(fraction)} if attack == "label_noise" else {}
    if off > 0:
        adaptive.update(on=int(on), off=int(off), phase=int(phase))

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
            **({} if statistic == "sum" else {"statistic": statistic}), **adaptive})
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(seeds):
        result = None if store is None else store.get(f"seed_{int(seed)}")
        if result is None:
            result = _one_seed(
                dataclasses.replace(config, seed=int(seed)), attack, attackers, window,
                threshold, min_scale, normalize, chunk_steps, dtype, optimizer, std=std,
                target=target, statistic=statistic, fraction=fraction, on=on, off=off,
                phase=phase,
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
        "fraction": float(fraction) if attack == "label_noise" else None,
        "mislabelled": mislabelled,
        "on": int(on),
        "off": int(off),
        "phase": int(phase),
        "duty": on / (on + off),
        "attacked_steps_scored": int(scored),
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
              std: float, target: int, statistic: str = "sum", fraction: float = 0.5,
              on: int = 1, off: int = 0, phase: int = 0, checkpoint_dir=None,
              progress=None) -> dict:
    from sklearn.metrics import roc_curve

    tic = time.perf_counter()
    setup = build(config, dtype)._replace(optimizer=optimizer)
    T, n = config.steps, config.nodes
    chosen = pick_attackers(attackers, n, config.seed)
    source, scale = attacked_stream(setup, attack, chosen, config.seed, std=std, target=target,
                                    fraction=fraction, on=on, off=off, phase=phase)
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
    strengths: Sequence[float],
    attackers: int | Sequence[int] | None = None,
    window: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    threshold: float = 3.5,
    *,
    attack: str = "gaussian_noise",
    sweep: str | None = None,
    std: float = 10.0,
    target: int = 0,
    fraction: float = 0.5,
    on: int = 1,
    phase: int = 0,
    statistic: str = "sum",
    chunk_steps: int = 25,
    dtype: Any = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Detection quality against the strength of an attack.

    One :func:`detection` per strength, with the same seeds (hence the same attackers,
    partitions and initialisations): where the attack becomes too weak to be flagged, and
    how much it costs the honest nodes there. What is swept (``sweep``):

    * ``"std"``: the noise standard deviation of ``gaussian_noise`` (the default for it);
    * ``"fraction"``: the share of each attacked batch that ``label_noise`` mislabels (the
      default for it), ``round(fraction · B)`` labels per batch;
    * ``"duty"``: the duty cycle ``d`` of an intermittent attacker (any ``attack``): ``on``
      attacked steps, then ``off =`` :func:`duty_off` ``(d, on)`` ``= round(on / d) − on``
      honest steps, repeating (``d = 1``: every step).

    Args:
      config, attackers, window, seeds, threshold, statistic, chunk_steps, dtype: as in
        :func:`detection`.
      strengths: ``[K]`` positive finite values of what is swept, e.g. ``(1, 3, 10, 30)``
        standard deviations, or fractions / duties in ``(0, 1]``.
      attack: one of :data:`DETECTION_ATTACKS` (``gaussian_noise`` for ``"std"``,
        ``label_noise`` for ``"fraction"``).
      sweep: one of :data:`SWEEPS`; default ``"std"`` for ``gaussian_noise``, ``"fraction"``
        for ``label_noise``, required otherwise.
      std, target, fraction: the attack's fixed settings (those not swept), as in
        :func:`detection`.
      on: attacked steps per period of the ``"duty"`` sweep (else every step is attacked).
      phase: the step at which an attacked block starts (``"duty"`` sweep).
      callback: called after each strength with ``(index, its detection result)``.
      progress: called with ``(strength index, seed index, steps done)``.
      checkpoint_dir: keeps every finished seed of every strength (a subfolder per
        strength); a second call with the same folder resumes.

    Returns:
      A JSON-ready dict: ``sweep``, ``strengths`` (the values swept), ``stds`` (the same
      values for ``"std"``, else None), the attack, ``seeds``, the settings, and ``points``:
      the :func:`detection` result of each strength (``roc_auc``, ``precision``, ``recall``,
      ``combined_precision``, ``combined_recall``, ``honest_accuracy`` summarised over
      seeds, the per-seed results, and ``std`` / ``fraction`` / ``on``, ``off``, ``duty``),
      plus the total wall time.

    Raises:
      ValueError: naming ``sweep``, ``attack`` or ``strengths`` (and as :func:`detection`)
        before any work.
    """
    if attack not in DETECTION_ATTACKS:
        raise ValueError(f"attack: must be one of {DETECTION_ATTACKS}, got {attack!r}")
    default = {"gaussian_noise": "std", "label_noise": "fraction"}.get(attack)
    sweep = default if sweep is None else sweep
    if sweep not in SWEEPS:
        raise ValueError(f"sweep: must be one of {SWEEPS} (the 'duty' cycle for --attack "
                         f"{attack}), got {sweep!r}")
    if sweep in ("std", "fraction") and sweep != default:
        needs = "gaussian_noise" if sweep == "std" else "label_noise"
        raise ValueError(f"sweep: {sweep!r} needs attack {needs!r}, got {attack!r}")
    what = {"std": "noise standard deviations (stds)", "fraction": "label_noise fractions",
            "duty": "duty cycles"}[sweep]
    try:
        values = [float(x) for x in strengths]
    except (TypeError, ValueError) as e:
        raise ValueError(f"strengths: the {what} must be a sequence of positive numbers, "
                         f"got {strengths!r}") from e
    top = np.inf if sweep == "std" else 1.0
    if not values or not all(np.isfinite(v) and 0 < v <= top for v in values):
        bounds = "positive finite numbers" if sweep == "std" else "numbers in (0, 1]"
        raise ValueError(f"strengths: the {what} must be a non-empty sequence of {bounds}, "
                         f"got {strengths!r}")

    def settings(v: float) -> dict:
        if sweep == "std":
            return {"std": v}
        if sweep == "fraction":
            return {"fraction": v}
        return {"on": on, "off": duty_off(v, on), "phase": phase}

    def folder(v: float) -> str:
        if sweep == "duty":
            return f"duty_on{on}_off{duty_off(v, on)}"
        return f"{sweep}_{v:g}"

    runs = [{"std": std, "target": target, "fraction": fraction, **settings(v)} for v in values]
    for kwargs in runs:  # every strength's settings checked before any work
        _check_detection(config, attack, attackers, window, seeds, threshold, chunk_steps,
                         statistic, **kwargs)
    start = time.perf_counter()
    points = []
    for i, (value, kwargs) in enumerate(zip(values, runs, strict=True)):
        sub = None if checkpoint_dir is None else os.path.join(checkpoint_dir, folder(value))
        point = detection(
            config, attack, attackers, window, seeds, threshold, chunk_steps=chunk_steps,
            dtype=dtype, checkpoint_dir=sub, statistic=statistic, **kwargs,
            progress=None if progress is None else (
                lambda seed, done, i=i: progress(i, seed, done)))
        points.append(point)
        if callback is not None:
            callback(i, point)
    return {"config": config, "attack": attack, "sweep": sweep, "strengths": values,
            "stds": values if sweep == "std" else None,
            "std": std if attack == "gaussian_noise" and sweep != "std" else None,
            "fraction": fraction if attack == "label_noise" and sweep != "fraction" else None,
            "on": on if sweep == "duty" else None,
            "seeds": list(seeds), "window": window, "threshold": threshold,
            "statistic": statistic, "points": points,
            "wall_seconds": time.perf_counter() - start}


__all__ = ["ATTACKS", "DATA_ATTACKS", "DETECTION_ATTACKS", "PARTIAL_ATTACKS", "SWEEPS",
           "UPDATE_ATTACKS", "AttackedSource", "apply_attack", "attacked_stream",
           "corruption_for", "detection", "duty_off", "intermittent_steps", "strength_curve"]
