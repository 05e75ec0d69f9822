"""Per-node contribution ledger over a run: who helped the network, who free-rode, who harmed.

The basis is the full-trajectory attribution (DESIGN §2.4,
:func:`dicejax.influence.trajectory_attribution`): ``A[t, j]``, the first-order effect of node
``j``'s local update at step ``t`` on the final probe objective ``Σ_k q_k L(θ_k^T; z')``
(negative = helpful). Summed over steps it is node ``j``'s network-level influence over the
whole run, ``I_j = Σ_t A[t, j]``.

* **contribution** ``c_j = −I_j``: positive = the node's data lowered the network's final
  probe loss (helpful), negative = it raised it (harmful), zero = a free-rider (``v_j = 0``,
  so its gate has no effect).
* **shares**, two normalisations (:func:`shares`):

  - ``"signed"``: ``c_j / Σ_k |c_k|`` — keeps the sign, so harm shows as a negative share;
    ``Σ_j |share_j| = 1``.
  - ``"clipped"``: ``max(c_j, 0) / Σ_k max(c_k, 0)`` — a payout rule: harmful nodes and
    free-riders get 0, the helpful ones split 1 (all zeros if nobody helped).

* **reciprocity** (optional): the accumulated proximal influence ``P[k, j]``
  (:func:`dicejax.influence.ledger` ``.proximal``, summed over steps) and each node's
  neighbourhood factor (:func:`dicejax.influence.neighbourhood_factor`, out-going over
  in-coming). Proximal influence is a loss change (> 0 = harm), so we also report the
  helpfulness given and received, ``−Σ_{k≠j} P[k, j]`` and ``−Σ_{k≠j} P[j, k]``.

**Exact counterfactuals** (what the first-order ledger estimates). Every function below
re-runs the recorded trajectory from its first recorded state ``θ^0`` with the recorded
batches (:func:`dicejax.run`, the simulator's own ``lax.scan``), with per-node gates on
top of the run's own, and reads the final probe objective ``Σ_k q_k L(θ_k^T; z')`` — the
objective of :func:`dicejax.influence.trajectory_attribution`. Many re-runs are one
``vmap``-ed program, chunked under a memory budget.

* :func:`leave_one_out` ``[n]``: ``L_full − L_without_j`` (negative = node ``j`` helped),
  either with ``j``'s local updates gated to 0 at every step (``mode="data"``: it still
  relays) or with ``j`` cut out of the graph (``mode="node"``).
* :func:`coalition_values`: the value of a coalition ``S`` of nodes,
  ``v(S)`` = the final objective when only the nodes in ``S`` train (the others' updates
  gated to 0 at every step; they still relay). ``v(all)`` is the recorded run.
* :func:`shapley` and :func:`banzhaf`: the nodes' Shapley and Banzhaf values of the game
  ``v``, sampled (permutations, coalitions) or enumerated when that is no dearer. The sign
  follows leave-one-out: a node's value is an average of marginal changes of the objective,
  ``v(S ∪ {j}) − v(S)``, so negative = it helped, and leave-one-out is the marginal at
  ``S`` = every node but ``j``. Shapley values are efficient: they sum to ``v(all) − v(none)``.

Everything here is a pure function of a recorded trajectory or of arrays.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence import ledger as ledger_fn
from dicejax.influence import neighbourhood_factor, trajectory_attribution
from dicejax.influence.budget import (
    balanced_chunk,
    check_budget,
    node_bytes,
    run_chunked,
    source_bytes,
)
from dicejax.influence.cascade import map_sources
from dicejax.influence.rerun import (
    check_query,
    float_dtype,
    gates_at,
    probe_losses,
    probe_vars,
    rerun_simulator,
)
from dicejax.mixing import make_mixer
from dicejax.robust import RobustMixer
from dicejax.simulator import Gate, LossFn, run
from dicejax.trajectory import Trajectory

PyTree = Any
ShareMode = Literal["signed", "clipped"]
RemovalMode = Literal["data", "node"]


class Reciprocity(NamedTuple):
    """Proximal (neighbour-to-neighbour) exchange summarised per node.

    Attributes:
      proximal: ``[n, n]`` accumulated proximal influence ``P[k, j]`` (> 0 = ``j`` harmed ``k``).
      given: ``[n]`` helpfulness node ``j`` gave its out-neighbours, ``−Σ_{k≠j} P[k, j]``.
      received: ``[n]`` helpfulness node ``k`` received, ``−Σ_{j≠k} P[k, j]``.
      factor: ``[n]`` neighbourhood factor (out-going over in-coming ``P``; NaN if none).
    """

    proximal: jax.Array
    given: jax.Array
    received: jax.Array
    factor: jax.Array


class Contribution(NamedTuple):
    """A run's contribution ledger.

    Attributes:
      per_step: ``[T, n]`` attribution ``A[t, j]`` (negative = helpful).
      influence: ``[n]`` ``Σ_t A[t, j]``.
      contribution: ``[n]`` ``−influence`` (positive = helpful).
      shares: ``[n]`` signed shares ``c_j / Σ|c|``.
      clipped_shares: ``[n]`` ``max(c, 0) / Σ max(c, 0)``.
      reciprocity: a :class:`Reciprocity`, or ``None`` when not computed.
    """

    per_step: jax.Array
    influence: jax.Array
    contribution: jax.Array
    shares: jax.Array
    clipped_shares: jax.Array
    reciprocity: Reciprocity | None = None


def shares(contribution: jax.Array, mode: ShareMode = "signed") -> jax.Array:
    """Normalised contribution shares.

    Args:
      contribution: ``[n]`` contributions (positive = helpful).
      mode: ``"signed"`` (``c / Σ|c|``, ``Σ|share| = 1``) or ``"clipped"``
        (``max(c, 0) / Σ max(c, 0)``, non-negative, sums to 1 unless nobody helped).

    Returns:
      ``[n]``; all zeros when the normaliser is zero.
    """
    c = jnp.asarray(contribution)
    if c.ndim != 1:
        raise ValueError(f"contribution: must be a vector [n], got shape {c.shape}")
    if mode == "signed":
        num, den = c, jnp.sum(jnp.abs(c))
    elif mode == "clipped":
        num = jnp.maximum(c, 0)
        den = jnp.sum(num)
    else:
        raise ValueError(f"mode: must be 'signed' or 'clipped', got {mode!r}")
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(c))


def reciprocity_summary(prox: jax.Array) -> Reciprocity:
    """Summarises an accumulated proximal-influence matrix ``[n, n]`` per node (given,
    received, neighbourhood factor); see :func:`dicejax.influence.reciprocity` for the
    pairwise ratio of Definition 5."""
    prox = jnp.asarray(prox)
    if prox.ndim != 2 or prox.shape[0] != prox.shape[1]:
        raise ValueError(f"prox: must be a square [n, n] matrix, got shape {prox.shape}")
    off = prox * (1 - jnp.eye(prox.shape[0], dtype=prox.dtype))
    return Reciprocity(prox, -off.sum(axis=0), -off.sum(axis=1), neighbourhood_factor(prox))


def from_attribution(attribution: jax.Array, prox: jax.Array | None = None) -> Contribution:
    """Builds the ledger from a ``[T, n]`` attribution (and optionally ``[n, n]`` proximal).

    Args:
      attribution: ``[T, n]`` per-(step, node) influence (negative = helpful), e.g. from
        :func:`dicejax.influence.trajectory_attribution`, or ``ledger(...).network``.
      prox: ``[n, n]`` accumulated proximal influence, or ``None``.

    Returns:
      A :class:`Contribution`.
    """
    a = jnp.asarray(attribution)
    if a.ndim != 2:
        raise ValueError(f"attribution: must be [T, n], got shape {a.shape}")
    influence = jnp.sum(a, axis=0)
    c = jnp.where(influence == 0, jnp.zeros_like(influence), -influence)  # no "−0" shares
    return Contribution(a, influence, c, shares(c, "signed"), shares(c, "clipped"),
                        None if prox is None else reciprocity_summary(prox))


def contributions(loss_fn: LossFn, traj: Trajectory, probe: PyTree,
                  node_weights: jax.Array | None = None, *, proximal: bool = False,
                  remat: bool = True) -> Contribution:
    """Every node's contribution to the final probe objective over a recorded run.

    One reverse pass through the re-run (:func:`dicejax.influence.trajectory_attribution`);
    with ``proximal=True`` also one jitted :func:`dicejax.influence.ledger` pass (``hops=1``,
    every step up to ``T − 1``) for the reciprocity summaries.

    Args:
      loss_fn: one node's loss.
      traj: trajectory recorded with ``record=True`` (update gates such as free-riders are
        part of it).
      probe: probe batch ``z'``.
      node_weights: ``q`` ``[n]`` (default ``1/n``).
      proximal: also compute :class:`Reciprocity`.
      remat: rematerialise the scan body in the backward pass.

    Returns:
      A :class:`Contribution`.
    """
    attribution = trajectory_attribution(loss_fn, traj, probe, node_weights, remat=remat)
    prox = None
    if proximal:
        prox = ledger_fn(loss_fn, traj, probe, hops=1, node_weights=node_weights).proximal
    return from_attribution(attribution, prox)


def reciprocity(prox: jax.Array) -> Reciprocity:
    """Deprecated name of :func:`reciprocity_summary` (``dicejax.influence.reciprocity`` is
    the pairwise ratio)."""
    warnings.warn("apps.contribution.reciprocity is deprecated; use reciprocity_summary",
                  DeprecationWarning, stacklevel=2)
    return reciprocity_summary(prox)


# --------------------------------------------------------------------------------------------
# Exact counterfactuals: re-runs of the whole trajectory with per-node gates
# --------------------------------------------------------------------------------------------


class LeaveOneOut(NamedTuple):
    """Leave-one-out effects with the per-observer detail (``observers=True``).

    Attributes:
      values: ``[n]`` ``L_full − L_without_j`` of the objective (negative = ``j`` helped).
      per_observer: ``[n, n]``; entry ``[k, j]`` is ``L(θ_k^T) − L(θ̃_k^T)``, the change of
        observer ``k``'s final probe loss that removing ``j`` undoes (who helped whom;
        negative = ``j`` helped ``k``). ``values = Σ_k q_k per_observer[:, j]`` (in
        ``mode="node"`` with ``q`` renormalised over ``k ≠ j``, and a zero diagonal: the
        removed node observes nothing).
      full: ``[n]`` every node's final probe loss in the full re-run.
    """

    values: jax.Array
    per_observer: jax.Array
    full: jax.Array


class GameValues(NamedTuple):
    """Values of the nodes in the coalition game ``v`` (:func:`coalition_values`).

    Attributes:
      values: ``[n]`` each node's value (an average marginal change of the objective,
        negative = it helped).
      stderr: ``[n]`` the Monte Carlo standard error of ``values`` (0 when ``exact``; NaN
        with fewer than two independent samples).
      num_samples: permutations (:func:`shapley`) or coalitions (:func:`banzhaf`) used.
      exact: every permutation or coalition was enumerated.
      grand: ``v(all)``, the objective of the recorded run (re-run).
      empty: ``v(none)``, the objective when no node trains (gossip of ``θ^0`` only).
    """

    values: jax.Array
    stderr: jax.Array
    num_samples: int
    exact: bool
    grand: jax.Array
    empty: jax.Array


def without_node(matrices: jax.Array, node) -> jax.Array:
    """Mixing matrices with one node cut out of the graph.

    Column ``node`` is zeroed (nobody receives from it), row ``node`` becomes ``e_node``
    (it only keeps its own state), and every other row is renormalised to sum to 1; a row
    left empty (a node that heard only ``node``) keeps its own state (``e_k``). The other
    nodes then gossip exactly as on the principal submatrix without ``node``, rows
    renormalised. ``node >= n`` returns the matrices unchanged.

    Args:
      matrices: ``[..., n, n]`` row-stochastic (row ``k`` = weights ``k`` receives).
      node: the removed node (int, may be traced).

    Returns:
      ``[..., n, n]`` row-stochastic.
    """
    n = matrices.shape[-1]
    eye = jnp.eye(n, dtype=matrices.dtype)
    keep = jnp.arange(n) != node
    w = jnp.where(keep[None, :], matrices, 0)
    w = jnp.where(keep[:, None], w, eye)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1), eye)
    return jnp.where(node < n, w, matrices)


@functools.partial(jax.jit, static_argnames=("loss_fn", "cut", "batch_size"))
def _final_losses(loss_fn, traj, probe, gates, removed, *, cut, batch_size):
    """``[m, n]`` final probe losses of ``m`` whole re-runs from ``θ^0``: run ``i`` gates
    every node's update at every step by ``gates[i]`` ``[n]`` (on top of the run's own
    gates) and, with ``cut``, gossips without node ``removed[i]`` (``n`` = nobody)."""
    T = traj.num_steps
    sim = rerun_simulator(loss_fn, traj)
    own = gates_at(traj, 0, T)
    state = traj.state_at(0)

    def one(x):
        g, j = x
        g_state = (g != 0).astype(g.dtype)
        if own is None:
            gate = Gate(jnp.broadcast_to(g, (T, g.shape[0])),
                        jnp.broadcast_to(g_state, (T, g.shape[0])))
        else:
            gate = Gate(own.update * g, own.state * g_state)
        s = sim
        if cut:
            s = sim.replace(mixer=make_mixer(without_node(traj.mixer.matrices, j)))
        final, _ = run(s, state, traj.batches, gate)
        return probe_losses(s, probe_vars(final), probe)

    return map_sources(one, (gates, removed), batch_size, unroll=False)


def _query(loss_fn: LossFn, traj: Any, probe: PyTree, node_weights: Any) -> jax.Array:
    """Validates a whole-run query (:func:`~dicejax.influence.rerun.check_query` over every
    step); returns ``q`` ``[n]`` in the trajectory's float dtype."""
    if not isinstance(traj, Trajectory):
        raise ValueError(f"traj: must be a Trajectory from dicejax.simulate, got {type(traj)}")
    q = check_query(traj, probe, 0, traj.num_steps, node_weights, loss_fn, reruns=True)
    return q.astype(float_dtype(traj))


def _check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer (re-runs per vmapped "
                         f"chunk) or None, got {batch_size!r}")
    return int(batch_size)


def _check_count(value: Any, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name}: must be an integer >= {least}, got {value!r}")
    return int(value)


def _runs_per_chunk(traj: Trajectory, probe: PyTree, loss_fn: LossFn, num_runs: int,
                    batch_size: int | None, memory_budget: Any, *, cut: bool) -> int:
    """Re-runs per vmapped chunk: ``batch_size``, or the first guess of what fits in the
    memory budget (one run keeps every node's state and one step's local updates, gossip
    and probe evaluations; with ``cut`` also its own ``[P, n, n]`` matrices), which
    :func:`~dicejax.influence.budget.run_chunked` checks by XLA's count."""
    budget = check_budget(memory_budget)
    if batch_size is not None:
        return min(batch_size, max(num_runs, 1))
    n = traj.num_nodes
    sim = traj.simulator.replace(loss_fn=loss_fn)
    nb = node_bytes(sim, traj.node_struct(), traj.batch_struct(), probe)
    per_run = source_bytes(nb, (n, n), kind="gt")
    if cut:
        m = traj.mixer.matrices
        per_run += 2 * m.size * m.dtype.itemsize
    return balanced_chunk(max(num_runs, 1), max(1, budget // max(per_run, 1)))


def _losses(loss_fn, traj, probe, gates: np.ndarray, removed: np.ndarray | None, *,
            batch_size, memory_budget) -> jax.Array:
    """Validated-input driver of :func:`_final_losses` (``gates`` ``[m, n]``)."""
    cut = removed is not None
    m, n = gates.shape
    dtype = float_dtype(traj)
    per = _runs_per_chunk(traj, probe, loss_fn, m, batch_size, memory_budget, cut=cut)
    removed = np.full((m,), n) if removed is None else removed
    return run_chunked(_final_losses, (loss_fn, traj, probe, jnp.asarray(gates, dtype),
                                       jnp.asarray(removed, jnp.int32)), dict(cut=cut),
                       chunk=per, num=m, what="re-run", unit="re-run",
                       budget=None if batch_size is not None else check_budget(memory_budget))


def leave_one_out(loss_fn: LossFn, traj: Trajectory, probe: PyTree, *,
                  mode: RemovalMode = "data", node_weights: jax.Array | None = None,
                  observers: bool = False, batch_size: int | None = None,
                  memory_budget: int | None = None) -> jax.Array | LeaveOneOut:
    """The exact effect of removing each node on the final probe objective.

    ``L_full − L_without_j`` with ``L = Σ_k q_k L(θ_k^T; z')`` (the objective of
    :func:`dicejax.influence.trajectory_attribution`; negative = node ``j`` helped). The
    recorded trajectory is re-run from its first recorded state with the recorded batches
    (and the run's own gates, e.g. free-riders): the full run and the ``n`` removals, all
    ``n + 1`` in one ``vmap``-ed program, chunked under a memory budget. Removing a node:

    * ``mode="data"``: ``j`` stays in the graph and relays, but its local updates (and its
      optimizer-state updates) are gated to 0 at every step — what
      :func:`contributions` estimates to first order (``contributions(...).influence``).
      A free-rider's value is exactly 0.
    * ``mode="node"``: ``j`` leaves the graph: its row and column leave every ``W^t``
      (time-varying mixers: every matrix of the period), the other rows are renormalised
      (:func:`without_node`). ``j`` also leaves the objective: both runs are scored on the
      other nodes, ``Σ_{k≠j} q_k L_k / Σ_{k≠j} q_k`` (0 when those weights sum to 0), so the
      value is what the rest of the network gains or loses by ``j``'s presence.

    Cost: ``n + 1`` re-runs of the whole trajectory (``O(n² T P)`` work with dense gossip),
    against one reverse pass for the estimate.

    Args:
      loss_fn: one node's loss.
      traj: a recorded trajectory (``record=True``).
      probe: the probe batch ``z'``.
      mode: ``"data"`` or ``"node"`` (above).
      node_weights: ``q`` ``[n]`` (default ``1/n``).
      observers: also return the per-observer matrix (a :class:`LeaveOneOut`).
      batch_size: re-runs per vmapped chunk (default: as many as fit ``memory_budget``).
      memory_budget: bytes for one chunk (default: half the free memory).

    Returns:
      ``[n]``, or with ``observers=True`` a :class:`LeaveOneOut`.

    Raises:
      ValueError: for an unknown ``mode``, bad ``node_weights``, ``batch_size`` or
        ``memory_budget``, an unrecorded trajectory or a probe the loss cannot read.
    """
    if mode not in ("data", "node"):
        raise ValueError(f"mode: must be 'data' or 'node', got {mode!r}")
    if not isinstance(observers, bool):
        raise ValueError(f"observers: must be a bool, got {observers!r}")
    batch_size = _check_batch_size(batch_size)
    check_budget(memory_budget)
    q = _query(loss_fn, traj, probe, node_weights)
    n = traj.num_nodes
    if mode == "node" and isinstance(traj.mixer, RobustMixer):
        raise ValueError("mode: 'node' re-wires W, which a robust combine rule does not "
                         "average with; use mode='data' for runs with an aggregator")
    if mode == "node" and jnp.shape(getattr(traj.mixer, "matrices", None))[1:] != (n, n):
        raise ValueError("traj: mode='node' needs the run's per-step matrices [P, n, n] "
                         "(mixer.matrices); re-run a sharded run without a mesh")
    if mode == "data":
        gates = np.vstack([np.ones((1, n)), 1 - np.eye(n)])
        losses = _losses(loss_fn, traj, probe, gates, None, batch_size=batch_size,
                         memory_budget=memory_budget)
        per_observer = (losses[0][:, None] - losses[1:].T)  # [k, j]
        values = q @ per_observer
    else:
        gates = np.ones((n + 1, n))
        removed = np.concatenate([[n], np.arange(n)])
        losses = _losses(loss_fn, traj, probe, gates, removed, batch_size=batch_size,
                         memory_budget=memory_budget)
        off = 1 - jnp.eye(n, dtype=q.dtype)
        per_observer = (losses[0][:, None] - losses[1:].T) * off
        weights = q[:, None] * off  # [k, j]: q_k over the observers k ≠ j
        total = jnp.sum(weights, axis=0)
        values = jnp.sum(weights * per_observer, axis=0) / jnp.where(total > 0, total, 1)
    if observers:
        return LeaveOneOut(values, per_observer, losses[0])
    return values


def _check_coalitions(coalitions: Any, n: int) -> np.ndarray:
    try:
        c = np.asarray(coalitions, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"coalitions: must be a numeric array [m, n], got {coalitions!r}"
                         ) from e
    if c.ndim != 2 or c.shape[1] != n or c.shape[0] < 1:
        raise ValueError(f"coalitions: must have shape [m >= 1, n={n}], got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("coalitions: contains non-finite values")
    return c


def coalition_values(loss_fn: LossFn, traj: Trajectory, probe: PyTree, coalitions: Any, *,
                     node_weights: jax.Array | None = None, observers: bool = False,
                     batch_size: int | None = None,
                     memory_budget: int | None = None) -> jax.Array:
    """The final probe objective of re-runs in which only a coalition of nodes trains.

    ``v(S) = Σ_k q_k L(θ_k^T(S); z')`` where every node outside ``S`` has its local updates
    gated to 0 at every step (it still relays, as in ``leave_one_out(mode="data")``), on top
    of the run's own gates. All ``m`` re-runs are one ``vmap``-ed program, chunked under a
    memory budget.

    Args:
      loss_fn, traj, probe, node_weights, batch_size, memory_budget: as in
        :func:`leave_one_out`.
      coalitions: ``[m, n]`` node gates: 1 = trains, 0 = gated (values in between scale
        the updates, see :func:`dicejax.simulator.gate`); bool masks work.
      observers: return every node's final probe loss ``[m, n]`` instead of ``v``.

    Returns:
      ``[m]`` ``v(S_i)`` (or ``[m, n]`` with ``observers=True``).
    """
    if not isinstance(observers, bool):
        raise ValueError(f"observers: must be a bool, got {observers!r}")
    batch_size = _check_batch_size(batch_size)
    check_budget(memory_budget)
    q = _query(loss_fn, traj, probe, node_weights)
    c = _check_coalitions(coalitions, traj.num_nodes)
    losses = _losses(loss_fn, traj, probe, c, None, batch_size=batch_size,
                     memory_budget=memory_budget)
    return losses if observers else losses @ q


def _stderr(samples: np.ndarray) -> np.ndarray:
    m = samples.shape[0]
    if m < 2:
        return np.full(samples.shape[1:], np.nan)
    return np.std(samples, axis=0, ddof=1) / np.sqrt(m)


def _check_target(target_error: Any) -> float | None:
    if target_error is None:
        return None
    if isinstance(target_error, bool) or not isinstance(target_error, int | float | np.number) \
            or not np.isfinite(target_error) or target_error <= 0:
        raise ValueError(f"target_error: must be a positive finite number or None, got "
                         f"{target_error!r}")
    return float(target_error)


def _every_coalition(n: int) -> np.ndarray:
    """``[2^n, n]`` 0/1: row ``i`` holds the bits of ``i`` (node ``j`` in iff bit ``j``)."""
    return ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)


def _enumerated(v: np.ndarray, n: int, weight: np.ndarray) -> np.ndarray:
    """``[n]`` ``Σ_{S ∌ j} weight[|S|] (v(S ∪ {j}) − v(S))`` from ``v`` ``[2^n]`` indexed by
    :func:`_every_coalition`'s bit order."""
    idx = np.arange(2 ** n)
    bits = 1 << np.arange(n)
    outside = (idx[:, None] & bits[None, :]) == 0  # [2^n, n]: j ∉ S
    size = _every_coalition(n).sum(axis=1).astype(int)
    gain = v[idx[:, None] | bits[None, :]] - v[:, None]
    return np.sum(np.where(outside, weight[size][:, None] * gain, 0.0), axis=0)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    return int(seed)


def shapley(loss_fn: LossFn, traj: Trajectory, probe: PyTree, *, num_permutations: int = 64,
            target_error: float | None = None, antithetic: bool = True, seed: int = 0,
            round_size: int = 16, node_weights: jax.Array | None = None,
            batch_size: int | None = None, memory_budget: int | None = None) -> GameValues:
    """Node Shapley values of the coalition game :func:`coalition_values`, by permutation
    sampling.

    ``φ_j = E_π [v(P_π(j) ∪ {j}) − v(P_π(j))]`` over uniformly random orders ``π`` of the
    nodes (``P_π(j)``: the nodes before ``j``), with ``v(S)`` the final objective when only
    the nodes in ``S`` train. Sign as :func:`leave_one_out` (negative = the node helped;
    leave-one-out is the marginal at the full coalition). Each permutation costs ``n − 1``
    re-runs (its prefixes; ``v(none)`` and ``v(all)`` are shared, two more re-runs per
    round) and its marginals sum to
    ``v(all) − v(none)`` exactly, so the estimate is efficient for any sample.

    Variance reduction: with ``antithetic`` every sampled order comes with its reverse
    (a node early in one is late in the other); a pair's mean is one sample of the
    standard error. Permutations are evaluated in rounds of ``round_size`` (one compiled
    program: the coalitions of a round are one vmapped batch of gated re-runs, chunked
    under the memory budget); with ``target_error`` sampling stops after the first round
    whose largest standard error is at most ``target_error``, else at ``num_permutations``
    (rounded up to whole rounds). When ``n! <= num_permutations`` the values are exact:
    every permutation is accounted for by enumerating the ``2^n`` coalitions once
    (``φ_j = Σ_{S∌j} |S|! (n−|S|−1)! / n! · [v(S ∪ {j}) − v(S)]``; ``stderr`` 0,
    ``num_samples = n!``).

    Args:
      loss_fn, traj, probe, node_weights, batch_size, memory_budget: as in
        :func:`leave_one_out`.
      num_permutations: the most permutations to evaluate (>= 1).
      target_error: stop once every node's standard error is at most this (nats), or None.
      antithetic: sample permutations in (order, reverse) pairs.
      seed: seed of the permutations.
      round_size: permutations per round (even with ``antithetic``).

    Returns:
      A :class:`GameValues` (``num_samples``: permutations used).

    Raises:
      ValueError: for bad sample counts, ``target_error``, ``round_size``, ``batch_size``
        and the rest of :func:`leave_one_out`'s inputs.
    """
    num_permutations = _check_count(num_permutations, "num_permutations")
    round_size = _check_count(round_size, "round_size")
    target_error = _check_target(target_error)
    if not isinstance(antithetic, bool):
        raise ValueError(f"antithetic: must be a bool, got {antithetic!r}")
    seed = _check_seed(seed)
    if antithetic and round_size % 2:
        raise ValueError(f"round_size: must be even with antithetic=True (order and reverse "
                         f"pairs), got {round_size}")
    batch_size = _check_batch_size(batch_size)
    check_budget(memory_budget)
    q = _query(loss_fn, traj, probe, node_weights)
    n = traj.num_nodes

    def values_of(masks):
        return np.asarray(_losses(loss_fn, traj, probe, masks, None, batch_size=batch_size,
                                  memory_budget=memory_budget) @ q, np.float64)

    if n <= 12 and math.factorial(n) <= num_permutations:
        v = values_of(_every_coalition(n))
        weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                           for s in range(n)] + [0.0])
        return GameValues(jnp.asarray(_enumerated(v, n, weight)), jnp.zeros(n),
                          math.factorial(n), True, jnp.asarray(v[-1]), jnp.asarray(v[0]))
    per_round = min(round_size, num_permutations + num_permutations % 2 * antithetic)
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    used = 0
    while used < num_permutations:
        if antithetic:
            half = np.argsort(rng.random((per_round // 2, n)), axis=1)
            perms = np.stack([half, half[:, ::-1]], axis=1).reshape(per_round, n)
        else:
            perms = np.argsort(rng.random((per_round, n)), axis=1)
        position = np.argsort(perms, axis=1)  # [P, n]: where each node stands
        prefixes = position[:, None, :] < np.arange(n + 1)[None, :, None]  # [P, n+1, n]
        # the interior prefixes and, once per round (one compiled shape), none and all
        masks = np.concatenate([np.stack([np.zeros(n), np.ones(n)]),
                                prefixes[:, 1:n].reshape(-1, n)])
        v = values_of(masks)
        empty, grand = v[:2]
        vals = np.concatenate([np.full((per_round, 1), empty),
                               v[2:].reshape(per_round, n - 1),
                               np.full((per_round, 1), grand)], axis=1)
        marginal = np.empty((per_round, n))
        np.put_along_axis(marginal, perms, np.diff(vals, axis=1), axis=1)  # i-th joins
        samples.append(marginal.reshape(-1, 2, n).mean(axis=1) if antithetic else marginal)
        used += per_round
        if target_error is not None and used < num_permutations:
            err = _stderr(np.concatenate(samples))
            if np.all(np.isfinite(err)) and err.max() <= target_error:
                break
    allv = np.concatenate(samples)
    return GameValues(jnp.asarray(allv.mean(axis=0)), jnp.asarray(_stderr(allv)), used, False,
                      jnp.asarray(grand), jnp.asarray(empty))


def banzhaf(loss_fn: LossFn, traj: Trajectory, probe: PyTree, *, num_samples: int = 128,
            seed: int = 0, node_weights: jax.Array | None = None,
            batch_size: int | None = None, memory_budget: int | None = None) -> GameValues:
    """Node Banzhaf values of the coalition game :func:`coalition_values`.

    ``β_j = 2^{1−n} Σ_{S ∌ j} [v(S ∪ {j}) − v(S)]``: the mean marginal change over
    coalitions drawn uniformly (every node in with probability ½), estimated by reusing
    every sample for every node (maximum sample reuse):
    ``β_j ≈ mean{v(S) : j ∈ S} − mean{v(S) : j ∉ S}``; each sample costs one re-run, shared
    by all ``n`` nodes (cheaper than :func:`shapley`'s ``n − 1`` per permutation). Sign as
    :func:`leave_one_out` (negative = helped). Unlike Shapley values they need not sum to
    ``v(all) − v(none)``. When ``2^n <= num_samples`` every coalition is enumerated once
    (exact, ``stderr`` 0, ``num_samples = 2^n``).

    Args:
      loss_fn, traj, probe, node_weights, batch_size, memory_budget: as in
        :func:`leave_one_out`.
      num_samples: coalitions to draw (>= 2).
      seed: seed of the coalitions.

    Returns:
      A :class:`GameValues` (``stderr``: of the difference of the two means, NaN where a
      side has fewer than two samples).
    """
    num_samples = _check_count(num_samples, "num_samples", least=2)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size)
    check_budget(memory_budget)
    q = _query(loss_fn, traj, probe, node_weights)
    n = traj.num_nodes
    exact = n <= 20 and 2 ** n <= num_samples
    if exact:
        masks = _every_coalition(n)
    else:
        drawn = np.random.default_rng(seed).random((num_samples, n)) < 0.5
        masks = np.vstack([np.zeros((1, n)), np.ones((1, n)), drawn]).astype(np.float64)
    v = np.asarray(_losses(loss_fn, traj, probe, masks, None, batch_size=batch_size,
                           memory_budget=memory_budget) @ q, np.float64)
    if exact:
        values = _enumerated(v, n, np.full(n + 1, 2.0 ** (1 - n)))
        return GameValues(jnp.asarray(values), jnp.zeros(n), 2 ** n, True,
                          jnp.asarray(v[-1]), jnp.asarray(v[0]))
    empty, grand, v, inside = v[0], v[1], v[2:], masks[2:]
    n_in = inside.sum(axis=0)
    n_out = len(v) - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = v @ inside / n_in
        mean_out = v @ (1 - inside) / n_out
        var_in = ((v[:, None] - mean_in) ** 2 * inside).sum(axis=0) / (n_in - 1)
        var_out = ((v[:, None] - mean_out) ** 2 * (1 - inside)).sum(axis=0) / (n_out - 1)
        stderr = np.where((n_in >= 2) & (n_out >= 2),
                          np.sqrt(var_in / n_in + var_out / n_out), np.nan)
    return GameValues(jnp.asarray(mean_in - mean_out), jnp.asarray(stderr), len(v), False,
                      jnp.asarray(grand), jnp.asarray(empty))


__all__ = [
    "Contribution",
    "GameValues",
    "LeaveOneOut",
    "Reciprocity",
    "banzhaf",
    "coalition_values",
    "contributions",
    "from_attribution",
    "leave_one_out",
    "reciprocity",
    "reciprocity_summary",
    "shapley",
    "shares",
    "without_node",
]
