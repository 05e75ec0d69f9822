"""Train a decentralized network and report per-node test accuracy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from dicejax.experiments.common import RunConfig, Setup, build
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
    """Runs ATC decentralized training as configured.

    Args:
      config: the run.
      record: keep the full trajectory (needed for influence).
      dtype: parameter/input float dtype (default float32).
      callback: progress hook ``(state, steps_done)`` called after each chunk.
      chunk_steps: scan length per chunk (for progress reporting; results are identical).
      checkpoint_dir: save a checkpoint after every chunk there, and resume from the newest
        complete one if the folder already holds this run (bit-identical results).

    Returns:
      A :class:`TrainResult`; ``summary`` holds the per-node final test accuracy and loss,
      their means, the evaluation curve, the mean train-loss curve and the wall time.
    """
    setup = build(config, dtype)
    start = time.perf_counter()
    if checkpoint_dir is not None:
        from dicejax.checkpoint import run_setup

        traj = run_setup(setup, checkpoint_dir, chunk_steps=chunk_steps, record=record,
                         callback=callback)
    else:
        traj = simulate(setup.loss_fn, setup.params, setup.batches, setup.topology,
                        setup.optimizer, record=record, eval_batch=setup.test,
                        eval_fn=setup.eval_fn if config.eval_every else None,
                        eval_every=config.eval_every, chunk_steps=chunk_steps,
                        callback=callback)
    jax.block_until_ready(traj.final_params)
    seconds = time.perf_counter() - start
    final = evaluate(setup, traj.final_params)
    curve = {}
    if config.eval_every:
        ev = traj.metrics["eval"]
        curve = {"step": np.asarray(ev["step"]),
                 "mean_accuracy": np.asarray(ev["accuracy"]).mean(axis=1),
                 "mean_loss": np.asarray(ev["loss"]).mean(axis=1)}
    topo = setup.topology
    summary = {
        "config": config,
        "topology": {"name": topo.name, "spectral_gap": topo.spectral_gap,
                     "doubly_stochastic": topo.is_doubly_stochastic},
        "per_node_accuracy": final["accuracy"],
        "per_node_loss": final["loss"],
        "mean_accuracy": float(final["accuracy"].mean()),
        "min_accuracy": float(final["accuracy"].min()),
        "mean_loss": float(final["loss"].mean()),
        "eval_curve": curve,
        "train_loss_curve": np.asarray(traj.metrics["loss"]).mean(axis=1),
        "consensus_distance": np.asarray(traj.metrics["consensus"]),
        "wall_seconds": seconds,
        "node_steps_per_second": config.nodes * config.steps / seconds,
    }
    return TrainResult(summary, traj, setup)
