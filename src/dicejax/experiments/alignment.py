"""Influence alignment: DICE-GT against every DICE-E estimator, for r = 1..R hops.

Trains a network (recording only the windows it scores), scores many (source node, step)
pairs with the exact counterfactual and with each estimator, and reports Pearson and
Spearman correlations per hop count, and for the network-level reading at each horizon.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dicejax.experiments.common import ResultStore, RunConfig, Runner, build, training_summary
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


#: ``alignment(sources_per_step=None)`` scores every node up to this many nodes, and this many
#: sampled sources per step above it.
MAX_SOURCES_PER_STEP = 64


def alignment(config: RunConfig, *, hops: int = 3, num_steps: int = 20,
              dtype: Any = jnp.float64, batch_size: int | None = None,
              callback: Callable[[str, int, int], None] | None = None,
              checkpoint_dir: str | os.PathLike | None = None,
              chunk_steps: int | None = None,
              sources_per_step: int | None = None) -> dict:
    """Scores ``num_steps × m`` (step, source) pairs with DICE-GT and every estimator.

    The run is streamed: it is trained without recording up to each scored step ``t``, and
    only the window ``[t, t + hops)`` is recorded (memory: one chunk of batches and one
    ``hops``-step recording, whatever ``T`` is). The scores equal those of one recording of
    the whole run.

    Args:
      config: the training run.
      hops: largest ``r``; every ``r = 1..hops`` is reported (one ``hops``-step cascade per
        step contains all shorter ones).
      num_steps: number of source steps, evenly spaced over ``[0, T − hops]``.
      dtype: float dtype of the run (float64 by default, so that far-hop ground truths are
        not drowned in float32 rounding; needs ``jax_enable_x64``).
      batch_size: sources re-run at a time (bounds memory).
      callback: progress ``callback(phase, done, total)``: ``("train", steps done, T)``
        after each training chunk, ``("score", scored steps done, S)`` after each step.
      checkpoint_dir: keep the training checkpoints and every scored step there; a second
        call with the same folder resumes where the first stopped.
      chunk_steps: training steps per chunk (default: the set-up's).
      sources_per_step: sources ``m`` scored at each step, drawn without replacement
        (seeded by ``config.seed`` and the step); default every node up to
        :data:`MAX_SOURCES_PER_STEP` nodes, that many above.

    Returns:
      A dict with the training summary, the scored steps, per-estimator correlations per
      ``r`` (``"shells"``) and per horizon (``"network"``), the direct-term diagnostic, and
      the raw scores ``{"gt": [R, S, n], name: [R, S, n]}`` for plotting;
      ``scoring_seconds`` is the scoring time of this call (steps restored from
      ``checkpoint_dir`` excluded), ``resumed_scores`` their number.
    """
    if not isinstance(hops, int) or hops < 1:
        raise ValueError(f"hops: must be a positive integer, got {hops!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    if config.steps < hops:
        raise ValueError(f"hops: {hops} exceeds the run's {config.steps} steps")
    n = config.nodes
    m = min(n, MAX_SOURCES_PER_STEP) if sources_per_step is None else sources_per_step
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"sources_per_step: must be an integer in [1, {n}], got {m!r}")
    setup = build(config, dtype)
    steps = np.unique(np.linspace(0, config.steps - hops, num_steps).round().astype(int))
    loss, probe = setup.loss_fn, setup.probe
    say = callback or (lambda phase, done, total: None)
    store = None
    if checkpoint_dir is not None:
        store = ResultStore(checkpoint_dir, {
            "experiment": "alignment", "config": dataclasses.asdict(config), "hops": hops,
            "steps": steps, "batch_size": batch_size, "sources_per_step": m,
            "dtype": np.dtype(dtype).name if dtype is not None else None})
    runner = Runner(setup, chunk_steps=chunk_steps,
                    checkpoint_dir=None if store is None else store.subfolder("train"),
                    callback=lambda state, done: say("train", done, config.steps))
    pieces, seconds, train_seconds, resumed = [], 0.0, 0.0, 0
    for i, t in enumerate(int(t) for t in steps):
        piece = None if store is None else store.get(f"score_{t}")
        if piece is None:
            tic = time.perf_counter()
            runner.advance(t)
            train_seconds += time.perf_counter() - tic
            tic = time.perf_counter()
            piece = _score_step(loss, runner.window(t + hops), probe, hops, batch_size,
                                sample_sources(n, m, config.seed, t))
            seconds += time.perf_counter() - tic
            if store is not None:
                store.put(f"score_{t}", piece)
        else:
            resumed += 1
        pieces.append(piece)
        say("score", i + 1, len(steps))
    tic = time.perf_counter()
    runner.advance(config.steps)
    train_seconds += time.perf_counter() - tic  # the unrecorded training, windows excluded
    summary = training_summary(setup, runner.state.params, runner.metrics(), train_seconds)
    # [R, S, n]
    scores = {k: np.stack([p["shells"][k] for p in pieces], axis=1) for k in pieces[0]["shells"]}
    nets = {k: np.stack([p["network"][k] for p in pieces], axis=1) for k in pieces[0]["network"]}
    table = {name: {r: _corr(scores["gt"][r - 1].ravel(), scores[name][r - 1].ravel())
                    for r in range(1, hops + 1)} for name in ESTIMATORS}
    net_table = {name: {h: _corr(nets["gt"][h - 1].ravel(), nets[name][h - 1].ravel())
                        for h in range(1, hops + 1)}
                 for name in ("E1 (paper)", "E2")}
    d_t, d_e = (np.concatenate([p["direct"][k] for p in pieces]) for k in ("taylor", "exact"))
    return {
        "train": summary,
        "steps": steps,
        "hops": hops,
        "pairs_per_hop": int(scores["gt"][0].size),
        "shells": table,
        "network": net_table,
        "direct_taylor_vs_exact": _corr(d_e, d_t),
        "scoring_seconds": seconds,
        "resumed_scores": resumed,
        "scores": scores,
        "network_scores": nets,
    }


def sample_sources(n: int, m: int, seed: int, step: int) -> np.ndarray | None:
    """``m`` distinct source nodes for one scored step (None: every node, in order)."""
    if m >= n:
        return None
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x5CE, step)))
    return np.sort(rng.choice(n, size=m, replace=False))


def _score_step(loss: Callable, window: Any, probe: Any, hops: int,
                batch_size: int | None, sources: np.ndarray | None = None) -> dict:
    """DICE-GT and every estimator at the first step of a recorded ``hops``-step window.

    Returns:
      Host arrays: ``shells[name]`` ``[R, m]`` (direct + shells 1..r), ``network[name]``
      ``[R, m]`` (Σ_k at t + h), ``direct`` ``{"taylor", "exact"}`` ``[m]``.
    """
    kw = dict(batch_size=batch_size, sources=sources)
    gt = gt_cascade(loss, window, probe, 0, hops, **kw)
    est = {o: e_cascade(loss, window, probe, 0, hops, order=o, **kw) for o in (1, 2)}
    shells = {"gt": gt.direct + jnp.cumsum(gt.per_hop, axis=0)}
    network = {"gt": gt.network_per_hop}
    for name, (order, direct) in ESTIMATORS.items():
        cas = est[order]
        own = gt.direct if direct == "exact" else cas.direct
        shells[name] = own + jnp.cumsum(cas.per_hop, axis=0)
        network[name] = cas.network_per_hop
    out = {"shells": shells, "network": network,
           "direct": {"taylor": est[1].direct, "exact": gt.direct}}
    return jax.tree.map(np.asarray, jax.device_get(out))
