"""The paper's Figure-1 experiment: the same batch placed at each node in turn.

Train briefly on the designed 16-node matrix (row-stochastic, not doubly stochastic; node 0
is dominant). At a chosen step ``t`` every node is given the SAME batch ``z`` (``batches[t, k]
= batches[t, 0]`` for every ``k``, set before simulating), so node ``j``'s update at ``t`` is
"the batch ``z`` placed at ``j``". One cascade (:func:`dicejax.influence.gt_cascade`, exact,
and :func:`dicejax.influence.e_cascade`, the estimate) scores every placement at once, hop by
hop. The influence magnitude of the batch placed at ``j`` is ``|network_j(h)|``, averaged over
several placement steps,, the absolute
change in the total probe loss of all nodes at step ``t + h`` (DESIGN §2.2's network-level
reading; ``h = r`` by default). The statistic is Spearman's rank correlation between each
node's out-going weight ``Σ_k W[k, j]`` and that magnitude (expected positive: a dominant node
spreads the same data further). Because the raw magnitude also depends on how strongly the
source's own state responds to the batch, the experiment also reports the amplification
``|network_j(h)| / |direct_j|`` (median over placements) and its Spearman with out-weight.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from dicejax import influence
from dicejax import topology as topo_lib
from dicejax.experiments.common import RunConfig, Runner, build
from dicejax.simulate import evaluate_nodes


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``1..m`` of a vector, ties given their average rank."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    r = np.empty(x.size, np.float64)
    r[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN if either is constant."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"spearman: need two vectors of equal length >= 2, got {x.shape}, "
                         f"{y.shape}")
    rx, ry = ranks(x) - (x.size + 1) / 2, ranks(y) - (y.size + 1) / 2
    den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / den) if den > 0 else float("nan")


def same_batch_at(batches: dict, step: int, source: int = 0) -> dict:
    """Batches ``[T, n, B, ...]`` with every node's batch at ``step`` set to ``source``'s."""
    return {k: v.at[step].set(jax.numpy.broadcast_to(v[step, source][None], v[step].shape))
            for k, v in batches.items()}


class PlacedSource(NamedTuple):
    """A batch source in which every node gets ``source_node``'s batch at ``steps``.

    The streamed twin of :func:`same_batch_at` (applied to each chunk as it is generated).

    Attributes:
      source: the underlying batch source.
      steps: global steps at which every node gets the same batch.
      source_node: whose batch is shared.
    """

    source: Callable[[int, int], dict]
    steps: tuple[int, ...]
    source_node: int = 0

    def __call__(self, start: int, stop: int) -> dict:
        chunk = {k: np.array(v) for k, v in self.source(start, stop).items()}
        for t in self.steps:
            if start <= t < stop:
                for v in chunk.values():
                    v[t - start] = v[t - start, self.source_node][None]
        return chunk

    def spec(self) -> dict:
        """JSON description for a checkpoint's ``run.json``."""
        spec = getattr(self.source, "spec", None)
        base = spec() if callable(spec) else {"kind": "callable"}
        return {**base, "same_batch_at": list(self.steps), "source_node": self.source_node}


def _cascade_summary(cas: influence.Cascade | influence.SparseCascade,
                     num_nodes: int) -> dict[str, Any]:
    return {
        "direct": np.asarray(cas.direct),
        "per_hop": np.asarray(cas.per_hop),
        "total": np.asarray(cas.total),
        "network": np.asarray(cas.network_per_hop),  # [r, n]
        "matrix": np.asarray(cas.dense(num_nodes).matrix),
    }


def cascade_experiment(config: RunConfig, matrix_path: str | None = None, hops: int = 3,
                       placements: int = 8, dtype: Any = None, *,
                       progress: Callable[[str, int, int], None] | None = None,
                       ) -> dict[str, Any]:
    """Figure 1: influence of one batch placed at each of the 16 nodes of the designed matrix.

    One placement's cascade is dominated by how each source's state happens to respond to
    the batch (its direct term varies several-fold between nodes), so the experiment repeats
    the placement at ``placements`` steps ``t_i = T − r·(placements − i)`` (a fresh shared
    batch each time, non-overlapping windows of ``r`` steps) and averages the magnitudes.

    Args:
      config: the run; ``topology`` and ``nodes`` are replaced by the designed matrix (16).
        ``steps`` is the whole training length ``T`` (the placements are its last
        ``r · placements`` steps).
      matrix_path: a CSV of another 16-node matrix (default: the paper's designed matrix
        bundled with dicejax, :func:`dicejax.topology.designed16`).
      hops: ``r``; cascades are scored at hops ``1..r``.
      placements: number of placement steps averaged.
      dtype: optional float dtype (``jnp.float64`` needs x64).
      progress: ``progress(phase, done, total)``: ``("train", steps done, T)`` after each
        chunk of training, ``("score", placements done, placements)`` after each cascade.

    Returns:
      A dict: ``out_weight`` ``[n]``; ``placement_steps`` ``[m]``; ``gt`` and ``e`` with
      ``direct [m, n]``, ``per_hop [m, r, n]``, ``total [m, n]``, ``network [m, r, n]``;
      ``magnitude`` ``[n]`` (GT: mean over placements of ``|network(r)|``);
      ``magnitude_per_hop`` ``[r, n]``; ``spearman`` (out-weight vs ``magnitude``),
      ``spearman_e`` (same with DICE-E), ``spearman_per_hop`` ``[r]``; ``amplification``
      ``[r, n]`` (median over placements of ``|network(h)| / |direct|``) and
      ``spearman_amplification`` ``[r]`` (out-weight vs it); ``mean_accuracy``;
      ``wall_seconds``.
    """
    tic = time.perf_counter()
    topo = topo_lib.designed16(matrix_path)
    config = dataclasses.replace(config, topology=str(matrix_path or "designed16"), nodes=topo.n)
    T = config.steps
    if not (isinstance(hops, int) and hops >= 1):
        raise ValueError(f"hops: must be a positive integer, got {hops!r}")
    if not (isinstance(placements, int) and 1 <= placements and hops * placements <= T):
        raise ValueError(f"placements: need 1 <= placements and hops * placements <= "
                         f"steps={T}, got {placements!r}")
    start = T - hops * placements
    local = [i * hops for i in range(placements)]
    setup = build(config, dtype)._replace(topology=topo)
    say = progress or (lambda phase, done, total: None)
    runner = Runner(setup, source=PlacedSource(setup.source, tuple(start + s for s in local)),
                    evaluate=False, callback=lambda state, done: say("train", done, T))
    runner.advance(start)
    traj = runner.record(T, move=True)  # the placement window [T - r·placements, T)
    gts, ests = [], []
    for i, s in enumerate(local):
        gts.append(_cascade_summary(influence.gt_cascade(setup.loss_fn, traj, setup.probe, s,
                                                         hops), topo.n))
        ests.append(_cascade_summary(influence.e_cascade(setup.loss_fn, traj, setup.probe, s,
                                                         hops), topo.n))
        say("score", i + 1, len(local))
    gt = {k: np.stack([g[k] for g in gts]) for k in gts[0]}
    est = {k: np.stack([g[k] for g in ests]) for k in ests[0]}
    out_weight = np.asarray(topo.out_weight, np.float64)
    per_hop = np.abs(gt["network"]).mean(axis=0)  # [r, n]
    magnitude = per_hop[-1]
    # amplification: |network(h)| over |direct| (the source's effect on its own probe loss),
    # median over placements — the spread per unit of local effect, which removes how
    # strongly each source's own state happens to respond to the batch
    direct = np.abs(gt["direct"])[:, None, :]  # [m, 1, n]
    ratio = np.abs(gt["network"]) / np.where(direct > 0, direct, np.nan)
    amplification = np.nanmedian(ratio, axis=0)  # [r, n]
    acc = evaluate_nodes(setup.eval_fn, traj.final_params, setup.test)
    return {
        "config": dataclasses.asdict(config),
        "hops": hops,
        "placement_steps": [start + s for s in local],
        "out_weight": out_weight,
        "gt": gt,
        "e": est,
        "magnitude": magnitude,
        "magnitude_per_hop": per_hop,
        "spearman": spearman(out_weight, magnitude),
        "spearman_e": spearman(out_weight, np.abs(est["network"][:, -1]).mean(axis=0)),
        "spearman_per_hop": [spearman(out_weight, per_hop[h]) for h in range(hops)],
        "amplification": amplification,
        "spearman_amplification": [spearman(out_weight, amplification[h])
                                   for h in range(hops)],
        "mean_accuracy": float(np.mean(np.asarray(acc["accuracy"]))),
        "wall_seconds": time.perf_counter() - tic,
    }


__all__ = ["PlacedSource", "cascade_experiment", "ranks", "same_batch_at", "spearman"]
