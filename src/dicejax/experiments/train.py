"""Train a decentralized network and report per-node test accuracy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from dicejax.experiments.common import RunConfig, Setup, Stopwatch, build, training_summary
from dicejax.simulate import NodeState, Trajectory, evaluate_nodes, simulate


class TrainResult(NamedTuple):
    """``summary`` is JSON-ready; ``traj`` and ``setup`` are for further analysis."""

    summary: dict
    traj: Trajectory
    setup: Setup


def evaluate(setup: Setup, params: Any) -> dict[str, np.ndarray]:
    """Per-node test metrics of stacked params: ``{"loss": [n], "accuracy": [n]}``."""
    fn = jax.jit(evaluate_nodes, static_argnums=0)
    return {k: np.asarray(v) for k, v in fn(setup.eval_fn, params, setup.test).items()}


def train(config: RunConfig, *, record: bool = False, dtype: Any = None,
          callback: Callable[[NodeState, int], None] | None = None,
          chunk_steps: int | None = None, checkpoint_dir: str | None = None) -> TrainResult:
    """Runs ATC decentralized training as configured, streaming the batches in chunks.

    Only one chunk of batches is in memory at a time (unless ``record``: the trajectory keeps
    every step), so memory does not grow with ``config.steps``.

    Args:
      config: the run.
      record: keep the full trajectory (needed for influence; memory ``∝ T``).
      dtype: parameter/input float dtype (default float32).
      callback: progress hook ``(state, steps_done)`` called after each chunk
        (``steps_done`` is global: a resumed run starts past 0).
      chunk_steps: steps per chunk (default
        :func:`dicejax.experiments.common.default_chunk_steps`; results are identical).
      checkpoint_dir: save a checkpoint after every chunk there, and resume from the newest
        complete one if the folder already holds this run (bit-identical results).

    Returns:
      A :class:`TrainResult`; ``summary`` holds the per-node final test accuracy and loss,
      their means, the evaluation curve, the train-loss curve (mean and quantiles over
      nodes), the consensus distance per step, the wall time, ``resumed_from`` (the step a
      checkpointed run resumed from) and ``node_steps_per_second`` (measured after the first
      chunk, so compilation and resumed steps are excluded; None if fewer than two chunks
      ran).
    """
    setup = build(config, dtype)
    chunk_steps = chunk_steps or setup.chunk_steps
    watch = Stopwatch()

    def on_chunk(state, done):
        watch.tick(done)
        if callback is not None:
            callback(state, done)

    resumed_from = 0
    start = time.perf_counter()
    if checkpoint_dir is not None:
        from dicejax.checkpoint import latest_step, run_setup

        resumed_from = min(latest_step(checkpoint_dir) or 0, config.steps)
        traj = run_setup(setup, checkpoint_dir, chunk_steps=chunk_steps, record=record,
                         callback=on_chunk)
    else:
        traj = simulate(setup.loss_fn, setup.params, setup.chunks(chunk_steps=chunk_steps),
                        setup.topology, setup.optimizer, record=record, eval_batch=setup.test,
                        eval_fn=setup.eval_fn if config.eval_every else None,
                        eval_every=config.eval_every, callback=on_chunk, consensus=True)
    jax.block_until_ready(traj.final_params)
    seconds = time.perf_counter() - start
    timed = watch.timed
    rate = config.nodes * timed[1] / timed[0] if timed else None
    summary = training_summary(setup, traj.final_params, traj.metrics, seconds, rate)
    summary["resumed_from"] = resumed_from
    summary["chunk_steps"] = chunk_steps
    return TrainResult(summary, traj, setup)
