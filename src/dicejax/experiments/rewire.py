"""Influence-guided rewiring against attackers: honest nodes' accuracy, fixed vs rewired graph.

Each seed builds one attacked run (:func:`dicejax.experiments.anomaly.apply_attack`: a
fraction of the nodes have corrupted data, or gated updates) and trains it under several
*arms* that differ only in how nodes choose whom to mix in:

* ``clean`` — the starting graph, no attack (the reference: what the attack costs);
* ``fixed`` — the starting graph throughout, under attack (the baseline);
* ``influence`` — every ``period`` steps each node keeps its ``keep`` most helpful
  candidates by accumulated proximal influence (:mod:`dicejax.apps.collaborators`);
* ``random`` — the same degree, ``keep`` candidates drawn at random each period (control:
  is it the influence, or just fewer neighbours?);
* ``oracle`` — the same degree, honest candidates first, drawn at random each period (the
  ceiling of selection: what knowing the attackers would give);
* ``influence_t`` — ``influence`` ranking candidates by the mean over standard error of
  their per-step scores instead of the sum (:func:`dicejax.apps.collaborators.update`,
  ``statistic="t"``);
* ``fixed+<rule>`` and ``influence+<rule>`` — the ``fixed`` and ``influence`` arms with a
  Byzantine-robust combine rule instead of the weighted average (:mod:`dicejax.robust`:
  ``trimmed_mean`` drops 1 value at each end, ``median``, ``clipped_gossip`` with the
  median-distance radius): the field's defences, alone and with rewiring.

Reported per arm: the honest nodes' mean test accuracy after ``T`` steps, and the weight
honest nodes put on attackers (their rows' attacker mass, averaged over honest nodes), over
the run and per period. Every arm runs with ``on_divergence="isolate"``: an attacker whose
updates diverge (e.g. a sign-flipper that nobody pulls back) stays non-finite without
stopping the run or crossing zero weights; each arm reports who diverged at which step, and
an honest node that diverged counts with accuracy 0 (``accuracy_finite``: the mean over the
honest nodes that stayed finite, NaN if none did).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import robust
from dicejax.apps import collaborators
from dicejax.experiments.anomaly import (
    DETECTION_ATTACKS,
    apply_attack,
    corruption_for,
    intermittent_steps,
)
from dicejax.experiments.common import (
    ResultStore,
    RunConfig,
    build,
    cached_optimizer,
    evaluate_params,
    make_topology,
    pick_attackers,
    summarize,
)
from dicejax.simulate import simulate
from dicejax.simulator import node_finite

ARMS = ("clean", "fixed", "influence", "random", "oracle")
RULE_ARMS = tuple(f"{base}+{rule}" for base in ("fixed", "influence") for rule in robust.RULES)
ALL_ARMS = (*ARMS, "influence_t", *RULE_ARMS)


def _random_chooser(seed: int, penalty: jax.Array | None = None):
    """Keeps ``keep`` candidates drawn uniformly at random each period.

    With ``penalty`` ``[n, n]`` (e.g. 2 on attackers' columns) the draw is shifted, so that
    penalised candidates come last (the oracle).
    """

    def choose(state, influence_steps, keep):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count)
        scores = jax.random.uniform(key, state.influence.shape, state.influence.dtype)
        if penalty is not None:
            scores = scores + penalty.astype(scores.dtype)
        matrix = collaborators.select(scores, state.candidates, keep)
        return state._replace(matrix=matrix.astype(state.matrix.dtype), count=state.count + 1)

    return choose


def _oracle_chooser(attackers: Sequence[int], n: int, seed: int):
    """Keeps honest candidates first, drawn at random each period (then attackers)."""
    return _random_chooser(seed, jnp.zeros((n, n)).at[:, jnp.asarray(list(attackers))].set(2.0))


def rewiring(
    config: RunConfig,
    attack: str = "label_permutation",
    attackers: int | Sequence[int] | None = None,
    keep: int | None = None,
    period: int = 10,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    arms: Sequence[str] = ARMS,
    *,
    candidates: str = "all",
    stride: int = 1,
    decay: float = 1.0,
    std: float = 10.0,
    target: int = 0,
    fraction: float = 0.5,
    on: int = 1,
    off: int = 0,
    dtype: Any = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: Callable[[int, str, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Trains every arm on the same attacked runs and compares honest accuracy.

    The batches of one seed are built whole (``[T, n, B, ...]``; the rewiring loop of
    :func:`dicejax.apps.collaborators.rewire` takes them so), so memory grows with ``T``.

    Args:
      config: the run (``config.seed`` is replaced by each seed). The paper-like setting:
        ``RunConfig(dataset="fashion_mnist", nodes=32, topology="exponential", model="mlp",
        lr=0.1, batch=16, samples_per_node=512)``.
      attack: one of :data:`dicejax.experiments.anomaly.DETECTION_ATTACKS` (with the
        adaptive ``label_noise``).
      attackers: node indices, or a count drawn at random per seed (default: a quarter of
        the nodes).
      keep: in-neighbours each node keeps (rewired arms; default: the starting graph's
        largest in-degree, so rewiring keeps the degree).
      period: steps between rewirings.
      seeds: seeds of data, initialisation, corruption and attackers.
      arms: names from :data:`ALL_ARMS` (default: the five :data:`ARMS`).
      candidates: whom a node may choose from: ``all`` (every other node; the starting
        graph is only the first period's choice) or ``graph`` (its in-neighbours in the
        starting graph; then ``keep`` must be below the in-degree for any choice).
      stride: score every ``stride``-th step of each period (``influence`` arm).
      decay: per-step discount of older influence (``influence`` arm).
      std: noise standard deviation for ``gaussian_noise``.
      target: class for ``label_flip``.
      fraction: share of each attacked batch ``label_noise`` mislabels, in ``(0, 1]``.
      on, off: an intermittent attacker attacks ``on`` steps, then is honest for ``off``
        (:func:`dicejax.experiments.anomaly.intermittent_steps`; default every step).
      dtype: float dtype (default float32).
      callback: called after each seed with ``(index, per-seed result)``.
      progress: called with ``(seed index, arm, steps done)`` as each arm trains (after each
        rewiring period, and once at the end of an arm).
      checkpoint_dir: keep every finished (seed, arm) there; a second call with the same
        folder resumes with the next one.

    Returns:
      A JSON-ready dict: settings; ``per_seed`` (attackers, and per arm the honest mean
      accuracy, attackers' weight share in honest rows overall and per period, the final
      weights ``[n, n]``, wall seconds); per arm ``accuracy`` and ``attacker_weight``
      summarised over seeds, and ``gain`` (``influence − fixed`` accuracy, paired by seed).
    """
    if attack not in DETECTION_ATTACKS:
        raise ValueError(f"attack: must be one of {DETECTION_ATTACKS}, got {attack!r}")
    intermittent_steps(config.steps, on, off)  # validates on and off before any work
    arms = list(arms)
    if not arms or any(a not in ALL_ARMS for a in arms) or len(set(arms)) != len(arms):
        raise ValueError(f"arms: must be distinct names from {ALL_ARMS}, got {arms!r}")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int | np.integer) for s in seeds):
        raise ValueError(f"seeds: must be a non-empty sequence of integers, got {seeds!r}")
    if keep is None:
        keep = default_keep(config)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: must be a positive integer, got {keep!r}")
    if isinstance(period, bool) or not isinstance(period, int) or not 1 <= period < config.steps:
        raise ValueError(f"period: must be an integer in [1, steps={config.steps}), "
                         f"got {period!r}")
    if candidates not in ("graph", "all"):
        raise ValueError(f"candidates: must be 'graph' or 'all', got {candidates!r}")
    if attackers is None:
        attackers = max(1, config.nodes // 4)
    pick_attackers(attackers, config.nodes, 0)  # validate before any work
    corruption = corruption_for(attack, std, target, fraction)
    optimizer = cached_optimizer(config.optimizer, config.lr)
    # the adaptive options join the run's identity only where used (older folders resume)
    adaptive = {k: v for k, v in (("fraction", fraction if attack == "label_noise" else None),
                                  ("on", on if off else None), ("off", off or None))
                if v is not None}
    store = None
    if checkpoint_dir is not None:
        store = ResultStore(checkpoint_dir, {
            "experiment": "rewiring", "config": dataclasses.asdict(config), "attack": attack,
            "attackers": attackers, "keep": keep, "period": period, "candidates": candidates,
            "stride": stride, "decay": decay, "std": std, "target": target,
            "dtype": None if dtype is None else np.dtype(dtype).name,
            **adaptive})
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(seeds):
        cfg = dataclasses.replace(config, seed=int(seed))
        result = _one_seed(cfg, attack, corruption, attackers, keep, period, arms, candidates,
                           stride, decay, dtype, optimizer, store=store, on=on, off=off,
                           progress=None if progress is None else
                           (lambda arm, done, i=i: progress(i, arm, done)))
        per_seed.append(result)
        if callback is not None:
            callback(i, result)
    out = {
        "config": config, "attack": attack, "keep": keep, "period": period,
        "candidates": candidates, "stride": stride, "decay": decay,
        "std": std if attack == "gaussian_noise" else None,
        "target": target if attack == "label_flip" else None,
        "fraction": fraction if attack == "label_noise" else None,
        "on": on, "off": off,
        "seeds": seeds, "arms": arms, "per_seed": per_seed,
        "accuracy": {a: summarize([r["arms"][a]["accuracy"] for r in per_seed]) for a in arms},
        "attacker_weight": {a: summarize([r["arms"][a]["attacker_weight"] for r in per_seed])
                            for a in arms},
    }
    if "fixed" in arms:
        out["gain"] = {a: summarize([r["arms"][a]["accuracy"] - r["arms"]["fixed"]["accuracy"]
                                    for r in per_seed]) for a in arms if a != "fixed"}
    out["wall_seconds"] = time.perf_counter() - start
    return out


def default_keep(config: RunConfig) -> int:
    """The starting graph's largest in-degree (self-loops not counted)."""
    support = make_topology(config.topology, config.nodes, config.seed).support
    return int((support & ~np.eye(config.nodes, dtype=bool)).sum(axis=1).max())


def attacker_weight(schedule: jax.Array, attackers: Sequence[int]) -> np.ndarray:
    """Weight honest nodes put on attackers at every step.

    Args:
      schedule: ``[T, n, n]`` mixing weights.
      attackers: attacking node indices.

    Returns:
      ``[T]``: ``mean_{k honest} Σ_{j attacker} W^t[k, j]``.
    """
    schedule = np.asarray(schedule, np.float64)
    n = schedule.shape[-1]
    bad = np.isin(np.arange(n), list(attackers))
    return schedule[:, ~bad][:, :, bad].sum(axis=2).mean(axis=1)


def _one_seed(config: RunConfig, attack: str, corruption, attackers, keep: int, period: int,
              arms: Sequence[str], candidates: str, stride: int, decay: float, dtype: Any,
              optimizer, store: ResultStore | None = None, progress=None, on: int = 1,
              off: int = 0) -> dict:
    n, T = config.nodes, config.steps
    chosen = pick_attackers(attackers, n, config.seed)
    results = {}
    todo = []
    for arm in arms:
        done = None if store is None else store.get(f"seed_{config.seed}_{arm}")
        if done is None:
            todo.append(arm)
        else:
            results[arm] = done
            if progress is not None:
                progress(arm, T)
    if not todo:
        return {"seed": config.seed, "attackers": chosen, "arms": results}
    setup = build(config, dtype)._replace(optimizer=optimizer)
    clean_batches = setup.batches  # [T, n, B, ...]: rewire() takes the whole run
    batches, scale = apply_attack(setup, attack, corruption, chosen, config.seed, on=on,
                                  off=off)
    honest = np.setdiff1d(np.arange(n), chosen)
    matrix = jnp.asarray(setup.topology.matrix)
    pool = ~jnp.eye(n, dtype=bool) if candidates == "all" else None
    for arm in arms:
        if arm not in todo:
            continue
        tic = time.perf_counter()
        say = (lambda done, arm=arm: progress(arm, done)) if progress is not None else None
        base, _, rule = arm.partition("+")
        rule = rule or None
        if base in ("clean", "fixed"):
            clean = base == "clean"
            traj = simulate(setup.loss_fn, setup.params, clean_batches if clean else batches,
                            setup.topology, optimizer, record=False,
                            update_scale=None if clean else scale, aggregator=rule,
                            on_divergence="isolate",
                            chunk_steps=max(1, T // 20),
                            callback=None if say is None else (lambda state, d, say=say: say(d)))
            params, diverged = traj.final_params, traj.diverged
            schedule = jnp.broadcast_to(matrix, (T, n, n))
            final = matrix
        else:
            chooser = {"influence": None, "influence_t": None,
                       "random": _random_chooser(config.seed),
                       "oracle": _oracle_chooser(chosen, n, config.seed)}[base]
            res = collaborators.rewire(
                setup.loss_fn, setup.params, batches, matrix, optimizer, setup.probe, keep,
                period, candidates=pool, decay=decay, update_scale=scale, stride=stride,
                chooser=chooser, score=base.startswith("influence"), aggregator=rule,
                on_divergence="isolate", statistic="t" if base == "influence_t" else "sum",
                callback=None if say is None else (lambda done, state, say=say: say(done)))
            params, schedule, final = res.state.params, res.schedule, res.rewire.matrix
            diverged = res.diverged
        acc = np.asarray(evaluate_params(setup.eval_fn, params, setup.test)["accuracy"])
        # a node can also turn NaN in the last gossip, after its last (finite) update
        ok = (np.asarray(diverged) < 0) & np.asarray(node_finite(params))
        alive = honest[ok[honest]]  # honest nodes that stayed finite
        acc = np.where(ok, acc, 0.0)  # a diverged model serves no one
        share = attacker_weight(schedule, chosen)
        results[arm] = {
            "accuracy": float(acc[honest].mean()),
            "accuracy_min": float(acc[honest].min()),
            "accuracy_finite": float(acc[alive].mean()) if alive.size else float("nan"),
            "diverged": {int(k): int(diverged[k]) for k in np.flatnonzero(diverged >= 0)},
            "honest_diverged": int(honest.size - alive.size),
            "final_non_finite": np.flatnonzero(~ok).tolist(),
            "attacker_weight": float(share.mean()),
            "attacker_weight_per_period": share[::period].tolist(),
            "final_matrix": np.asarray(final, np.float64),
            "wall_seconds": time.perf_counter() - tic,
        }
        if say is not None:
            say(T)
        if store is not None:
            store.put(f"seed_{config.seed}_{arm}", results[arm])
    results = {arm: results[arm] for arm in arms}
    return {"seed": config.seed, "attackers": chosen, "arms": results}


__all__ = ["ALL_ARMS", "ARMS", "RULE_ARMS", "attacker_weight", "default_keep", "rewiring"]
