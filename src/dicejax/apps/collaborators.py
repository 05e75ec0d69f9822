"""Collaborator selection: influence-guided rewiring during training.

Every node ``k`` has a fixed pool of *candidates* — the nodes whose updates it can receive
(by default its in-neighbours in the starting graph) — and mixes in only some of them. It
ranks candidates by how much their updates helped its own probe loss::

    G^t[k, j] = q_k g_k^{t+1} · v_j^t        (< 0: j's update lowered k's probe loss)

the proximal influence of Definition 4 per unit of mixing weight
(:func:`dicejax.influence.proximal_steps` with ``weighted=False``). ``k`` can compute it for
every candidate, mixed in or not, because it only needs ``j``'s update ``v_j``, not ``j``'s
weight in ``k``'s row; so a neighbour dropped early is still watched and can come back.

The rule (:func:`update`): every ``period`` steps, node ``k``

1. **accumulates** ``I[k, j] ← decay^S · I[k, j] + Σ_s decay^{S−1−s} G^s[k, j]`` over the
   ``S`` scored steps of the period (every step, or every ``stride``-th; ``decay = 1``:
   plain sum over the run so far);
2. **keeps** the ``keep`` candidates with the lowest (most helpful) score, ties broken
   by the lower node index (:func:`select`): ``statistic="sum"`` (the default) scores by
   ``I[k, j]``; ``statistic="t"`` by the mean over standard error of the scored steps'
   ``G^s[k, j]``, ``t[k, j] = m / (sd / √S_tot)`` (the same discount on every moment), so a
   candidate whose updates help only on average, with a large spread — a noisy attacker —
   ranks below one that helps consistently;
3. **re-weights** its row uniformly over itself and the kept candidates:
   ``W[k, j] = 1 / (m_k + 1)`` with ``m_k = min(keep, #candidates of k)`` — the row stays
   stochastic and the graph's degree is bounded by ``keep``.

:func:`rewire` runs training with this rule: :func:`dicejax.run` one period at a time from
the last state, with the period's weights (one validation up front, one compiled step for
every period), recording the period to score it. It returns the exact
per-step weight schedule, so the same run can be replayed with
``simulate(..., schedule[:, ...])`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import robust
from dicejax import topology as topo_lib
from dicejax.apps.anomaly import t_statistic
from dicejax.influence.proximal import proximal_steps
from dicejax.mixing import make_mixer
from dicejax.simulate import plan_run
from dicejax.simulator import LossFn, NodeState

PyTree = Any


STATISTICS = ("sum", "t")


class RewireState(NamedTuple):
    """State of influence-guided rewiring.

    Attributes:
      influence: ``[n, n]`` discounted accumulated per-unit-weight proximal influence
        ``I[k, j]`` (zero outside the candidates).
      matrix: ``[n, n]`` the row-stochastic mixing weights in use.
      candidates: ``[n, n]`` bool, ``j`` may send to ``k`` (``j ≠ k``).
      count: number of rewirings so far (int32 scalar).
      square: ``[n, n]`` the same discounted sum of ``G^s[k, j]²`` (for ``statistic="t"``).
      steps: the same discounted count of scored steps (a float scalar).
    """

    influence: jax.Array
    matrix: jax.Array
    candidates: jax.Array
    count: jax.Array
    square: jax.Array | None = None
    steps: jax.Array | None = None

    def t_statistic(self) -> jax.Array:
        """``[n, n]``: mean over standard error of the scored steps' influence per edge
        (``±inf`` where the spread is 0 and the mean is not; 0 with no evidence)."""
        return t_statistic(self.influence, self.square, self.steps)


def _check_matrix(matrix, name: str) -> jax.Array:
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name}: must be a square [n, n] matrix, got shape {matrix.shape}")
    return matrix


def _check_keep(keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or keep < 0:
        raise ValueError(f"keep: must be a non-negative integer, got {keep!r}")
    return int(keep)


def select(influence: jax.Array, candidates: jax.Array, keep: int) -> jax.Array:
    """Each node keeps its ``keep`` most helpful candidates, uniformly weighted.

    Args:
      influence: ``[n, n]`` accumulated influence ``I[k, j]`` (lower = more helpful;
        ``+inf``: never kept, e.g. a diverged node).
      candidates: ``[n, n]`` bool; the diagonal is ignored (a node always keeps itself).
      keep: in-neighbours kept per node (fewer if a node has fewer candidates).

    Returns:
      ``[n, n]`` row-stochastic ``W``: ``1 / (m_k + 1)`` on ``k`` and its ``m_k`` kept
      candidates, zero elsewhere.
    """
    influence = _check_matrix(influence, "influence")
    candidates = _check_matrix(candidates, "candidates")
    if candidates.shape != influence.shape or candidates.dtype != jnp.bool_:
        raise ValueError(f"candidates: must be a bool matrix shaped like influence "
                         f"{influence.shape}, got {candidates.shape} of {candidates.dtype}")
    if bool(jnp.any(jnp.isnan(jnp.where(candidates, influence, 0)))):
        raise ValueError("influence: NaN on candidate edges (+inf marks a candidate never "
                         "to keep)")
    return _select(influence, candidates, _check_keep(keep))


@jax.jit
def _select(influence, candidates, keep):
    n = influence.shape[0]
    cand = candidates & ~jnp.eye(n, dtype=bool)
    scores = jnp.where(cand, influence, jnp.inf)
    order = jnp.argsort(scores, axis=1, stable=True)  # ties: lower index first
    rank = jnp.argsort(order, axis=1, stable=True)
    kept = cand & (rank < keep) & (scores < jnp.inf)
    mask = kept | jnp.eye(n, dtype=bool)
    w = mask.astype(influence.dtype)
    return w / w.sum(axis=1, keepdims=True)


def init(topology: topo_lib.Topology | jax.Array,
         candidates: jax.Array | None = None, dtype: Any = None) -> RewireState:
    """Starts from a static mixing matrix.

    Args:
      topology: the starting ``[n, n]`` row-stochastic weights (a static
        :class:`~dicejax.topology.Topology` or an array).
      candidates: ``[n, n]`` bool pool of allowed senders (default: the starting graph's
        in-neighbours, ``W[k, j] > 0``, ``j ≠ k``).
      dtype: float dtype of the influence and weights (default: the matrix's).

    Returns:
      A :class:`RewireState` with zero influence.
    """
    if isinstance(topology, topo_lib.Topology):
        if topology.is_time_varying:
            raise ValueError("topology: must be static [n, n]; rewiring replaces the weights")
        matrix = jnp.asarray(topology.matrix)
    else:
        matrix = _check_matrix(topology, "topology")
        topo_lib.validate_mixing(matrix, name="topology")
    n = matrix.shape[0]
    if candidates is None:
        candidates = matrix > 0
    candidates = _check_matrix(candidates, "candidates")
    if candidates.shape != (n, n) or candidates.dtype != jnp.bool_:
        raise ValueError(f"candidates: must be a bool [{n}, {n}] matrix, got "
                         f"{candidates.shape} of {candidates.dtype}")
    candidates = candidates & ~jnp.eye(n, dtype=bool)
    dtype = matrix.dtype if dtype is None else dtype
    return RewireState(jnp.zeros((n, n), dtype), matrix.astype(dtype), candidates,
                       jnp.zeros((), jnp.int32), jnp.zeros((n, n), dtype),
                       jnp.zeros((), dtype))


def update(state: RewireState, influence_steps: jax.Array, keep: int,
           decay: float = 1.0, statistic: str = "sum") -> RewireState:
    """Accumulates one period's influence and rewires.

    Args:
      state: current :class:`RewireState`.
      influence_steps: ``[S, n, n]`` per-step, per-unit-weight proximal influence of the
        period (:func:`dicejax.influence.proximal_steps` with ``weighted=False``). NaN
        entries (a diverged sender or observer of an isolating run) accumulate as ``+inf``:
        that candidate is never kept again.
      keep: in-neighbours kept per node.
      decay: per-step discount of older evidence, in ``(0, 1]``.
      statistic: ``"sum"`` ranks candidates by the accumulated influence, ``"t"`` by its
        mean over standard error (:meth:`RewireState.t_statistic`).

    Returns:
      The new :class:`RewireState` (new ``influence`` and ``matrix``, ``count + 1``).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic: must be one of {STATISTICS}, got {statistic!r}")
    g = jnp.asarray(influence_steps)
    n = state.matrix.shape[0]
    if g.ndim != 3 or g.shape[1:] != (n, n) or g.shape[0] < 1:
        raise ValueError(f"influence_steps: must be [S, {n}, {n}] with S >= 1, got {g.shape}")
    if not (isinstance(decay, int | float) and 0 < decay <= 1):
        raise ValueError(f"decay: must lie in (0, 1], got {decay!r}")
    keep = _check_keep(keep)
    S = g.shape[0]
    weights = jnp.asarray(decay, g.dtype) ** jnp.arange(S - 1, -1, -1, dtype=g.dtype)
    square = state.square if state.square is not None else jnp.zeros_like(state.influence)
    steps = state.steps if state.steps is not None else jnp.zeros((), state.influence.dtype)
    total = decay ** S * state.influence + jnp.einsum("s,skj->kj", weights, g)
    total = jnp.where(jnp.isnan(total), jnp.inf, total)  # a diverged node: never kept
    total = jnp.where(state.candidates, total, 0).astype(state.influence.dtype)
    square = decay ** S * square + jnp.einsum("s,skj->kj", weights, g * g)
    square = jnp.where(state.candidates & ~jnp.isnan(square), square, 0).astype(total.dtype)
    steps = (decay ** S * steps + weights.sum()).astype(total.dtype)
    new = RewireState(total, state.matrix, state.candidates, state.count + 1, square, steps)
    scores = total if statistic == "sum" else jnp.where(
        jnp.isinf(total), jnp.inf, new.t_statistic())
    scores = jnp.where(state.candidates, scores, 0)
    return new._replace(matrix=select(scores, state.candidates, keep).astype(
        state.matrix.dtype))


class RewireResult(NamedTuple):
    """A training run with influence-guided rewiring.

    Attributes:
      state: final :class:`~dicejax.simulate.NodeState`.
      schedule: ``[T, n, n]`` the weights used at every step (replay with
        ``simulate(..., topo=schedule)``).
      rewire: final :class:`RewireState`.
      loss: ``[T, n]`` training loss of every node at every step.
      diverged: ``[n]`` int, the global step at which each node's local update first became
        non-finite (isolating runs), −1 for never.
    """

    state: NodeState
    schedule: jax.Array
    rewire: RewireState
    loss: jax.Array
    diverged: np.ndarray | None = None


def rewire(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    topology: topo_lib.Topology | jax.Array,
    optimizer: optax.GradientTransformation,
    probe: PyTree,
    keep: int,
    period: int = 10,
    *,
    candidates: jax.Array | None = None,
    decay: float = 1.0,
    update_scale: jax.Array | None = None,
    node_weights: jax.Array | None = None,
    stride: int = 1,
    chooser: Callable[[RewireState, jax.Array | None, int], RewireState] | None = None,
    score: bool = True,
    callback: Callable[[int, RewireState], None] | None = None,
    aggregator: Any = None,
    on_divergence: str = "raise",
    statistic: str = "sum",
) -> RewireResult:
    """Decentralized training in which every node periodically re-chooses its collaborators.

    Steps ``[0, period)`` use the starting weights; after each period every node updates its
    accumulated influence and re-selects (:func:`update`), and the next period runs with the
    new weights. Each period is simulated with ``record=True`` (memory
    ``O(period · n · P)``) and scored with :func:`dicejax.influence.proximal_steps`.

    Args:
      loss_fn: one node's training loss.
      params: stacked initial parameters, leaves ``[n, ...]``.
      batches: leaves ``[T, n, B, ...]``.
      topology: static starting weights ``[n, n]``.
      optimizer: optax optimizer of every node.
      probe: the probe batch ``z'`` by which nodes judge candidates (shared; a node would
        use its own validation data in practice).
      keep: in-neighbours kept per node.
      period: steps between rewirings.
      candidates: ``[n, n]`` bool allowed senders (default: the starting in-neighbours).
      decay: per-step discount of older influence (``1`` = plain sum).
      update_scale: ``[T, n]`` gates of the local updates (attackers; see
        :mod:`dicejax.attacks`).
      node_weights: ``q`` ``[n]`` of the influence (does not change any node's ranking).
      stride: score every ``stride``-th step of each period (the probe gradients of all
        nodes at a scored step cost about ``probe size / batch size`` training steps).
      chooser: replaces :func:`update` — ``chooser(state, influence_steps, keep)`` — for
        control experiments (random or oracle selection).
      score: ``False`` skips recording and scoring; ``chooser`` then gets
        ``influence_steps=None`` (controls that ignore influence).
      callback: called after each rewiring with ``(step, new RewireState)``.
      aggregator: a robust combine rule (:mod:`dicejax.robust`, or its name) each period
        runs over its chosen graph; None: plain gossip. The scores stay the per-unit-weight
        proximal influence ``q_k g_k^{t+1} · v_j`` of each candidate's update.
      on_divergence: ``"raise"`` (default) stops at the first non-finite update, naming
        step and node; ``"isolate"`` runs on (see :func:`dicejax.simulate`): a diverged
        node's values never cross zero weights, its scores are NaN, so nobody keeps it
        after the next rewiring, and ``RewireResult.diverged`` says who diverged when.
      statistic: how candidates are ranked, ``"sum"`` or ``"t"`` (see :func:`update`).

    Returns:
      A :class:`RewireResult`.
    """
    if isinstance(period, bool) or not isinstance(period, int | np.integer) or period < 1:
        raise ValueError(f"period: must be a positive integer, got {period!r}")
    if not score and chooser is None:
        raise ValueError("score: False needs a chooser that ignores influence")
    keep = _check_keep(keep)
    leaves = jax.tree.leaves(batches)
    if not leaves or jnp.ndim(leaves[0]) < 2:
        raise ValueError("batches: must be a pytree with leaves [T, n, B, ...]")
    T = int(jnp.shape(leaves[0])[0])
    dtype = jnp.result_type(jax.tree.leaves(params)[0])
    state = init(topology, candidates, dtype)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic: must be one of {STATISTICS}, got {statistic!r}")
    chooser = (lambda s, g, k: update(s, g, k, decay, statistic)) if chooser is None \
        else chooser
    rule = robust.as_aggregator(aggregator)
    plan = plan_run(loss_fn, params, batches, state.matrix, optimizer, mixing="dense",
                    update_scale=update_scale, aggregator=rule, on_divergence=on_divergence)
    node_state, schedule, losses = plan.run_state, [], []
    diverged = np.full(plan.n, -1, np.int64)
    for lo in range(0, T, int(period)):
        hi = min(lo + int(period), T)
        mixer = make_mixer(state.matrix[None])
        plan.use_mixer(mixer if rule is None else rule.wrap(mixer))
        node_state, traj = plan.run_window(node_state, batches, lo, hi,
                                           record=score and hi < T)
        if rule is not None and score and hi < T:  # the scores read no weights
            traj = traj.replace(simulator=traj.simulator.replace(mixer=mixer))
        schedule.append(jnp.broadcast_to(state.matrix, (hi - lo, *state.matrix.shape)))
        losses.append(traj.metrics["loss"])
        diverged = np.where(diverged >= 0, diverged, traj.diverged)
        if hi < T:
            g = proximal_steps(loss_fn, traj, probe, node_weights=node_weights,
                               weighted=False, stride=stride) if score else None
            state = chooser(state, g, keep)
            if callback is not None:
                callback(hi, state)
        del traj
    return RewireResult(plan.host_state(node_state), jnp.concatenate(schedule), state,
                        jnp.concatenate(losses), diverged)


__all__ = ["STATISTICS", "RewireResult", "RewireState", "init", "rewire", "select", "update"]
