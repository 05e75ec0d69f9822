"""Differentiable topology studies: gradients with respect to the graph, and graph learning.

The mixing matrix ``W`` is just an array inside the simulator, so any scalar computed from a
run is a differentiable function of its edge weights. This module provides the three pieces
needed to *optimise* a graph on a fixed support:

1. **Parameterisations** (:class:`Parameterization`, an ``init`` / ``weights`` pair) mapping
   unconstrained logits to a valid mixing matrix whose non-zeros lie on a boolean support:

   * :func:`row_softmax` — row-wise softmax over the allowed entries: row-stochastic,
     non-negative, exactly zero off the support (:func:`masked_softmax`);
   * :func:`sinkhorn` — a fixed number of Sinkhorn–Knopp normalisations in log space
     (:func:`sinkhorn_weights`): doubly stochastic to a tolerance that shrinks geometrically
     with the number of iterations, exactly row-stochastic (the last normalisation is over
     rows), and symmetric up to that tolerance when the logits are symmetrised
     (``symmetric=True``, for symmetric supports).

   Both work on a static ``[n, n]`` matrix or a per-step schedule ``[T, n, n]`` (the support
   broadcasts over the leading axis).

2. **Budgets.** A *hard* in-degree budget ``max_degree = k``: each row keeps only its ``k``
   largest allowed off-diagonal logits (:func:`top_k_support`; the diagonal is kept when the
   support allows it). The selection is recomputed from the current logits at every call
   and carries no gradient (iterative hard thresholding: gradients reach only the kept
   edges). For a symmetric :func:`sinkhorn` the kept set is made symmetric by keeping an edge
   only when both endpoints select it (so the degree is at most ``k``). A *soft* budget:
   ``entropy_weight = λ`` adds ``λ ·`` :func:`row_entropy` to the objective; ``exp`` of a
   row's entropy is its effective number of senders (self included), so the penalty pushes
   each node towards fewer, heavier in-edges (:func:`effective_degree` reports it).

3. **Objectives**, each a pure function ``objective(W, problem) -> scalar`` to *minimise*,
   differentiable with respect to ``W`` through the whole ``lax.scan`` of the run (see
   :func:`run_with`; the scan body is wrapped in ``jax.checkpoint`` when ``problem.remat``,
   so reverse mode stores one :class:`~dicejax.simulate.NodeState` per step, never the
   activations of the local updates):

   * :func:`probe_loss` — ``Σ_k q_k L(θ_k^T; z')``, the final weighted probe loss;
   * :func:`consensus` — the final consensus distance ``(1/n) Σ_k ||θ_k^T − θ̄^T||²``;
   * :func:`mixing_rate` — ``1 −`` :func:`spectral_gap` (depends on ``W`` only);
   * :func:`contribution_spread` — an influence-based fairness objective: the squared
     coefficient of variation of the nodes' total contributions (see its docstring).

:func:`topology_optimizer` builds an optax-style ``init`` / ``step`` pair over a
:class:`TopologyOptState`; :func:`optimize` is the convenience loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import pytrees
from dicejax import topology as topo_lib
from dicejax.mixing import Mixer, make_mixer
from dicejax.simulate import check_batches, check_params
from dicejax.simulator import DEFAULT_OPTIMIZER, NodeState, atc, consensus_distance, run

PyTree = Any
Objective = Callable[[jax.Array, "Problem"], jax.Array]

__all__ = [
    "OBJECTIVES",
    "OptimizeResult",
    "Parameterization",
    "Problem",
    "Rollout",
    "TopologyOptState",
    "TopologyOptimizer",
    "consensus",
    "contribution_spread",
    "contributions",
    "effective_degree",
    "get_objective",
    "masked_softmax",
    "mixing_rate",
    "optimize",
    "probe_loss",
    "rollout",
    "row_entropy",
    "row_softmax",
    "run_with",
    "sinkhorn",
    "sinkhorn_weights",
    "spectral_gap",
    "stationary_distribution",
    "support_of",
    "top_k_support",
    "topology_optimizer",
    "whole_run_influence",
]

_NEG = -1e9  # stands for log 0 on masked entries; exp(_NEG - anything finite) == 0 exactly


# --------------------------------------------------------------------------------------------
# Supports
# --------------------------------------------------------------------------------------------


def support_of(graph: Any, self_loops: bool = True) -> np.ndarray:
    """The boolean support ``[n, n]`` of a topology, mixing matrix or adjacency.

    Args:
      graph: a :class:`~dicejax.topology.Topology` (union of its supports over the period),
        an ``[n, n]`` matrix or 0/1 adjacency (``graph[k, j] != 0``: j may send to k).
      self_loops: add the diagonal (every node may keep part of its own half-step).

    Returns:
      ``[n, n]`` bool numpy array.

    Raises:
      ValueError: for a non-square input or a row with no allowed entry.
    """
    if isinstance(graph, topo_lib.Topology):
        mask = np.array(graph.support, dtype=bool)
    else:
        arr = np.asarray(graph)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"support: must be a square [n, n] array, got shape {arr.shape}")
        mask = arr != 0
    if self_loops:
        mask = mask | np.eye(mask.shape[0], dtype=bool)
    _check_support(mask)
    return mask


def _check_support(support: Any) -> None:
    if isinstance(support, jax.core.Tracer):
        return
    mask = np.asarray(support)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"support: must be a square [n, n] bool array, got shape {mask.shape}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"support: row {int(empty[0])} allows no entry (a node must receive "
                         "from someone; add self-loops)")


def top_k_support(logits: jax.Array, support: jax.Array, k: int) -> jax.Array:
    """Keeps each row's ``k`` largest allowed off-diagonal logits (the hard degree budget).

    The diagonal stays as in ``support``. The selection is a piecewise-constant function of
    ``logits`` and is computed under ``stop_gradient``; ties go to the lower index.

    Args:
      logits: ``[..., n, n]``.
      support: ``[n, n]`` bool, allowed entries.
      k: in-degree budget (senders other than the node itself), ``k >= 0``.

    Returns:
      ``[..., n, n]`` bool, a subset of ``support`` with at most ``k`` off-diagonal entries
      per row.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"max_degree: must be a non-negative integer, got {k!r}")
    n = logits.shape[-1]
    eye = jnp.eye(n, dtype=bool)
    off = jnp.asarray(support, bool) & ~eye
    if k >= n - 1:
        return jnp.broadcast_to(jnp.asarray(support, bool), logits.shape)
    scores = jnp.where(off, jax.lax.stop_gradient(logits), -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)  # [..., n, k]
    chosen = jnp.any(jax.nn.one_hot(idx, n, dtype=bool), axis=-2) if k else jnp.zeros_like(off)
    return (chosen & off) | (jnp.asarray(support, bool) & eye)


# --------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------


def masked_softmax(logits: jax.Array, support: jax.Array) -> jax.Array:
    """Row-wise softmax over the allowed entries; exactly zero elsewhere.

    Args:
      logits: ``[..., n, n]`` unconstrained real numbers.
      support: ``[..., n, n]`` bool (broadcasts against ``logits``), every row non-empty.

    Returns:
      ``W`` ``[..., n, n]``: non-negative, rows sum to 1, ``W = 0`` where ``support`` is False.
      Gradients with respect to masked logits are exactly zero.
    """
    z = jnp.where(support, logits, _NEG)
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.where(support, jnp.exp(z), 0.0)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def sinkhorn_weights(logits: jax.Array, support: jax.Array, num_iters: int = 50) -> jax.Array:
    """Sinkhorn–Knopp projection of ``exp(logits)`` on ``support`` to doubly stochastic form.

    ``num_iters`` alternations of column and row normalisation in log space, the last one
    over rows: the result is exactly row-stochastic and doubly stochastic up to a column-sum
    error that shrinks geometrically in ``num_iters`` (for supports with total support, e.g.
    any connected symmetric support with self-loops). Every iteration is differentiable (a
    ``lax.scan`` of fixed length), so gradients are those of the unrolled iteration.

    Args:
      logits: ``[..., n, n]``.
      support: ``[..., n, n]`` bool (broadcasts), every row and column non-empty.
      num_iters: number of (column, row) normalisation pairs, ``>= 1``.

    Returns:
      ``W`` ``[..., n, n]``, zero off the support.
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters: must be a positive integer, got {num_iters!r}")
    log_k = jnp.where(support, logits, _NEG)
    log_k = log_k - jax.nn.logsumexp(log_k, axis=-1, keepdims=True)

    def body(x, _):
        x = x - jax.nn.logsumexp(x, axis=-2, keepdims=True)
        x = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
        return x, None

    log_k, _ = jax.lax.scan(body, log_k, None, length=num_iters)
    return jnp.where(support, jnp.exp(log_k), 0.0)


class Parameterization(NamedTuple):
    """Unconstrained logits ↔ a valid mixing matrix on a fixed support (optax-style pair).

    Attributes:
      init: ``init(steps=None, matrix=None) -> logits``: ``[n, n]`` (or ``[steps, n, n]``
        for a per-step schedule); zeros (uniform weights over the support) unless ``matrix``
        ``[n, n]`` or ``[T, n, n]`` is given, in which case the logits reproduce it
        (``log W`` on the support; exactly for :func:`row_softmax`, and for
        :func:`sinkhorn` when ``matrix`` is already doubly stochastic).
      weights: ``weights(logits) -> W`` of the same shape as ``logits``.
      support: ``[n, n]`` bool, the allowed entries.
      name: ``"row_softmax"`` or ``"sinkhorn"``.
    """

    init: Callable[..., jax.Array]
    weights: Callable[[jax.Array], jax.Array]
    support: np.ndarray
    name: str


def _make_init(support: np.ndarray, symmetric: bool) -> Callable[..., jax.Array]:
    n = support.shape[0]

    def init(steps: int | None = None, matrix: Any = None) -> jax.Array:
        shape = (n, n) if steps is None else (int(steps), n, n)
        if matrix is None:
            return jnp.zeros(shape)
        w = jnp.asarray(matrix)
        if w.shape[-2:] != (n, n):
            raise ValueError(f"matrix: must be [{n}, {n}] or [T, {n}, {n}], got {w.shape}")
        if not isinstance(w, jax.core.Tracer) and bool(jnp.any(jnp.where(support, w, 1) <= 0)):
            raise ValueError("matrix: must be positive on every allowed entry of the support")
        logits = jnp.where(support, jnp.log(jnp.where(support, w, 1.0)), 0.0)
        if symmetric:
            logits = 0.5 * (logits + jnp.swapaxes(logits, -1, -2))
        return jnp.broadcast_to(logits, shape) + 0.0

    return init


def row_softmax(support: Any, max_degree: int | None = None) -> Parameterization:
    """Row-stochastic ``W`` on a support: ``W[k] = softmax(logits[k] over allowed j)``.

    Args:
      support: ``[n, n]`` bool (see :func:`support_of`), every row non-empty. It may be
        directed.
      max_degree: hard in-degree budget ``k`` (see :func:`top_k_support`), or None.

    Returns:
      A :class:`Parameterization`; ``weights(zeros)`` is the uniform weighting
      ``1 / |support row|``.
    """
    support = np.asarray(support, dtype=bool)
    _check_support(support)

    def weights(logits: jax.Array) -> jax.Array:
        mask = support if max_degree is None else top_k_support(logits, support, max_degree)
        return masked_softmax(logits, mask)

    return Parameterization(_make_init(support, False), weights, support, "row_softmax")


def sinkhorn(support: Any, num_iters: int = 50, max_degree: int | None = None,
             symmetric: bool = True) -> Parameterization:
    """Doubly stochastic ``W`` on a support by a fixed number of Sinkhorn iterations.

    Args:
      support: ``[n, n]`` bool; with ``symmetric=True`` it must be symmetric.
      num_iters: Sinkhorn iterations (see :func:`sinkhorn_weights`).
      max_degree: hard in-degree budget (see :func:`top_k_support`); with ``symmetric``
        the kept edge set is ``top-k(row) ∧ top-k(column)`` (degree ``<= k``). Keep the
        self-loops in the support so that no column of the kept set is ever empty.
      symmetric: symmetrise the logits, ``(L + Lᵀ)/2``, so that ``W`` is symmetric (up to
        the Sinkhorn tolerance) with a real spectrum.

    Returns:
      A :class:`Parameterization`.

    Raises:
      ValueError: for an asymmetric support with ``symmetric=True``.
    """
    support = np.asarray(support, dtype=bool)
    _check_support(support)
    if symmetric and not np.array_equal(support, support.T):
        raise ValueError("sinkhorn: symmetric=True needs a symmetric support; pass "
                         "symmetric=False for a directed support")
    if not support.any(axis=0).all():
        raise ValueError("sinkhorn: every column of the support needs an allowed entry")

    def weights(logits: jax.Array) -> jax.Array:
        if symmetric:
            logits = 0.5 * (logits + jnp.swapaxes(logits, -1, -2))
        mask = support
        if max_degree is not None:
            mask = top_k_support(logits, support, max_degree)
            if symmetric:
                mask = mask & jnp.swapaxes(mask, -1, -2)
        return sinkhorn_weights(logits, mask, num_iters)

    return Parameterization(_make_init(support, symmetric), weights, support, "sinkhorn")


def row_entropy(matrix: jax.Array) -> jax.Array:
    """Mean over rows (and steps) of ``−Σ_j W[k, j] log W[k, j]`` (``0 log 0 = 0``); scalar."""
    pos = matrix > 0
    safe = jnp.where(pos, matrix, 1.0)
    return -jnp.mean(jnp.sum(jnp.where(pos, matrix * jnp.log(safe), 0.0), axis=-1))


def effective_degree(matrix: jax.Array) -> jax.Array:
    """``exp(row entropy) − 1`` per row ``[..., n]``: the effective number of senders."""
    pos = matrix > 0
    safe = jnp.where(pos, matrix, 1.0)
    h = -jnp.sum(jnp.where(pos, matrix * jnp.log(safe), 0.0), axis=-1)
    return jnp.exp(h) - 1.0


# --------------------------------------------------------------------------------------------
# The problem and the differentiable run
# --------------------------------------------------------------------------------------------


@pytrees.dataclass
class Problem:
    """A fixed decentralized training run whose mixing matrix is the free variable.

    Attributes:
      params: ``θ^0``, pytree with leaves ``[n, ...]``.
      batches: training batches, leaves ``[T, n, B, ...]``.
      probe: the probe batch ``z'`` ``[P, ...]`` of the objectives (use a validation split,
        never the test set, when the learned graph is evaluated on held-out data).
      node_weights: ``q`` ``[n]`` (weights of the nodes' probe losses).
      loss_fn: one node's loss ``loss_fn(params, batch) -> scalar`` (static).
      optimizer: the nodes' local optax optimizer (static).
      remat: wrap the scan body in ``jax.checkpoint`` (static); results are identical.
    """

    params: PyTree
    batches: PyTree
    probe: PyTree
    node_weights: jax.Array
    loss_fn: Callable = pytrees.static_field()
    optimizer: optax.GradientTransformation = pytrees.static_field(default=DEFAULT_OPTIMIZER)
    remat: bool = pytrees.static_field(default=True)

    @classmethod
    def create(cls, loss_fn: Callable, params: PyTree, batches: PyTree, probe: PyTree,
               optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
               node_weights: jax.Array | None = None, remat: bool = True) -> Problem:
        """Builds a problem after checking the leading axes (``q`` defaults to ``1/n``)."""
        n = check_params(params)
        check_batches(batches, n)
        dtype = jnp.result_type(*[x for x in jax.tree.leaves(params)])
        q = jnp.full((n,), 1.0 / n, dtype) if node_weights is None else jnp.asarray(node_weights)
        if q.shape != (n,):
            raise ValueError(f"node_weights: must have shape [{n}], got {q.shape}")
        return cls(params, batches, probe, q, loss_fn, optimizer, remat)

    @property
    def num_nodes(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])

    @property
    def num_steps(self) -> int:
        return int(jax.tree.leaves(self.batches)[0].shape[0])


class Rollout(NamedTuple):
    """What :func:`run_with` returns.

    Attributes:
      state: the final :class:`~dicejax.simulator.NodeState` (``θ^T``).
      loss: ``[T, n]`` train loss before each step.
      consensus: ``[T]`` consensus distance after each gossip.
    """

    state: NodeState
    loss: jax.Array
    consensus: jax.Array


def _mixer(matrix: jax.Array, problem: Problem) -> Mixer:
    n, t = problem.num_nodes, problem.num_steps
    shape = tuple(matrix.shape)
    if shape not in ((n, n), (t, n, n)):
        raise ValueError(f"W: must have shape [{n}, {n}] or [{t}, {n}, {n}] (T={t} steps, "
                         f"n={n} nodes), got {shape}")
    return make_mixer(matrix[None] if matrix.ndim == 2 else matrix)


def run_with(matrix: jax.Array, problem: Problem, scale: jax.Array | None = None) -> Rollout:
    """The problem's run with mixing ``W``: differentiable with respect to ``W`` (and
    ``scale``).

    The same :func:`dicejax.run` (one ``lax.scan`` of ``Simulator.step``) that
    :func:`dicejax.simulate` runs; with ``problem.remat`` the scan body is rematerialised in
    the backward pass, so reverse-mode memory is ``O(T · n · P)`` for the per-step states.

    Args:
      matrix: ``W`` ``[n, n]`` (static) or ``[T, n, n]`` (per step), row-stochastic.
      problem: the run.
      scale: optional ``[n]`` gates on the local updates, the same at every step (see
        :func:`dicejax.simulator.gate`; 1 is the actual run).

    Returns:
      A :class:`Rollout`.
    """
    sim = atc(problem.loss_fn, problem.optimizer, _mixer(matrix, problem))
    gates = None
    if scale is not None:
        gates = jnp.broadcast_to(scale, (problem.num_steps, problem.num_nodes))
    state, outs = run(sim, sim.init(problem.params), problem.batches, gates,
                      remat=problem.remat)
    return Rollout(state, outs.loss, outs.consensus)


def rollout(matrix: jax.Array, problem: Problem, scale: jax.Array | None = None) -> Rollout:
    """Deprecated name of :func:`run_with`."""
    warnings.warn("topology_opt.rollout is deprecated; use topology_opt.run_with",
                  DeprecationWarning, stacklevel=2)
    return run_with(matrix, problem, scale)


def _probe_objective(problem: Problem, params: PyTree) -> jax.Array:
    losses = jax.vmap(problem.loss_fn, in_axes=(0, None))(params, problem.probe)
    return jnp.dot(problem.node_weights.astype(losses.dtype), losses)


# --------------------------------------------------------------------------------------------
# Objectives (all to minimise)
# --------------------------------------------------------------------------------------------


def probe_loss(matrix: jax.Array, problem: Problem) -> jax.Array:
    """Final weighted probe loss ``Σ_k q_k L(θ_k^T; z')``; scalar."""
    return _probe_objective(problem, run_with(matrix, problem).state.params)


def consensus(matrix: jax.Array, problem: Problem) -> jax.Array:
    """Final consensus distance ``(1/n) Σ_k ||θ_k^T − θ̄^T||²`` (all leaves); scalar."""
    return consensus_distance(run_with(matrix, problem).state.params)


def stationary_distribution(matrix: jax.Array) -> jax.Array:
    """The left Perron vector ``π`` of a row-stochastic ``W``: ``πᵀ W = πᵀ``, ``Σ π = 1``.

    Solved as a linear system (``(Wᵀ − I) π = 0`` with one equation replaced by the
    normalisation), so it is differentiable; it needs a unique stationary distribution
    (e.g. a strongly connected support). Uniform for doubly stochastic ``W``.

    Args:
      matrix: ``[..., n, n]``.

    Returns:
      ``[..., n]``. Consensus under ``W`` converges to the ``π``-weighted average.
    """
    n = matrix.shape[-1]
    a = jnp.swapaxes(matrix, -1, -2) - jnp.eye(n, dtype=matrix.dtype)
    a = a.at[..., -1, :].set(1.0)
    b = jnp.zeros(matrix.shape[:-1], matrix.dtype).at[..., -1].set(1.0)
    return jnp.linalg.solve(a, b[..., None])[..., 0]


def spectral_gap(matrix: jax.Array) -> jax.Array:
    """``1 − ||W − 1πᵀ||₂``: a differentiable spectral gap of a row-stochastic ``W``.

    ``1πᵀ`` is the consensus projector (``π`` from :func:`stationary_distribution`, so
    ``1/n · 11ᵀ`` for doubly stochastic ``W``), and ``||·||₂`` the largest singular value:
    ``||Wx − 1πᵀx|| ≤ ||W − 1πᵀ||₂ ||x − 1πᵀx||`` bounds the contraction of the
    disagreement per gossip step. For symmetric doubly stochastic ``W`` this is the usual
    ``1 − |λ₂|``; for other ``W`` it is a lower bound on ``1 − |λ₂|``
    (:attr:`dicejax.topology.Topology.spectral_gap`) and may be negative. Differentiable
    wherever the largest singular value is simple. For a schedule ``[T, n, n]`` it is the
    mean of the per-step gaps.

    Args:
      matrix: ``[n, n]`` or ``[T, n, n]``.

    Returns:
      Scalar.
    """
    pi = stationary_distribution(matrix)
    dev = matrix - pi[..., None, :]
    sigma = jnp.linalg.svd(dev, compute_uv=False)[..., 0]
    return jnp.mean(1.0 - sigma)


def mixing_rate(matrix: jax.Array, problem: Problem | None = None) -> jax.Array:
    """``1 −`` :func:`spectral_gap` (to minimise); ``problem`` is ignored. Scalar."""
    del problem
    return 1.0 - spectral_gap(matrix)


def whole_run_influence(matrix: jax.Array, problem: Problem) -> jax.Array:
    """Each node's total first-order contribution to the final probe objective ``[n]``.

    ``c_j = d/dα_j Σ_k q_k L(θ_k^T(α); z')`` at ``α = 1``, where ``α_j`` gates node ``j``'s
    local update at every step — which equals ``Σ_t A[t, j]`` of
    :func:`dicejax.influence.trajectory_attribution` (a gate shared over steps has the sum
    of the per-step derivatives). Negative = the node's data helped. One reverse pass.
    """
    n = problem.num_nodes
    dtype = problem.node_weights.dtype

    def final(alpha):
        return _probe_objective(problem, run_with(matrix, problem, alpha).state.params)

    return jax.grad(final)(jnp.ones((n,), dtype))


def contributions(matrix: jax.Array, problem: Problem) -> jax.Array:
    """Deprecated name of :func:`whole_run_influence`."""
    warnings.warn("topology_opt.contributions is deprecated; use "
                  "topology_opt.whole_run_influence", DeprecationWarning, stacklevel=2)
    return whole_run_influence(matrix, problem)


def contribution_spread(matrix: jax.Array, problem: Problem) -> jax.Array:
    """Influence-based fairness: spread of the nodes' contribution shares; scalar ``>= 0``.

    With ``c`` from :func:`whole_run_influence` and shares ``s_j = c_j / Σ_i c_i`` (the sign
    cancels), returns
    ``n Σ_j (s_j − 1/n)²`` = ``Var(c) / mean(c)²`` (the squared coefficient of variation):
    0 when every node's data moves the final probe loss equally, large when a few nodes
    dominate (e.g. a node with a large out-going weight). Well defined when the total
    contribution is clearly non-zero (training that lowers the probe loss). Its gradient
    with respect to ``W`` is a second derivative through the run (reverse over reverse,
    both rematerialised).
    """
    c = whole_run_influence(matrix, problem)
    n = c.shape[0]
    shares = c / jnp.sum(c)
    return n * jnp.sum((shares - 1.0 / n) ** 2)


OBJECTIVES: dict[str, Objective] = {
    "probe_loss": probe_loss,
    "consensus": consensus,
    "spectral_gap": mixing_rate,
    "fairness": contribution_spread,
}
"""Objectives by name (all minimised): ``spectral_gap`` minimises ``1 − gap``."""


def get_objective(objective: str | Objective) -> Objective:
    """An objective by name (see :data:`OBJECTIVES`) or the callable itself."""
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: unknown {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective]


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


class TopologyOptState(NamedTuple):
    """State of :func:`topology_optimizer`.

    Attributes:
      logits: ``[n, n]`` or ``[T, n, n]`` unconstrained edge parameters.
      opt_state: the optax state of the logits.
      count: int32 scalar, steps taken.
    """

    logits: jax.Array
    opt_state: optax.OptState
    count: jax.Array


class TopologyOptimizer(NamedTuple):
    """An ``init`` / ``step`` pair (plus the map to weights), in the style of optax.

    Attributes:
      init: ``init(logits) -> TopologyOptState``.
      step: ``step(state, problem) -> (state, loss)``: one optax update of the logits;
        ``loss`` is the penalised objective *before* the update. Jitted.
      weights: ``weights(state) -> W``.
    """

    init: Callable[[jax.Array], TopologyOptState]
    step: Callable[[TopologyOptState, Problem], tuple[TopologyOptState, jax.Array]]
    weights: Callable[[TopologyOptState], jax.Array]


def topology_optimizer(
    objective: str | Objective,
    parameterization: Parameterization,
    learning_rate: float = 0.05,
    *,
    tx: optax.GradientTransformation | None = None,
    entropy_weight: float = 0.0,
) -> TopologyOptimizer:
    """Gradient descent on the edge logits of ``parameterization`` (Adam by default).

    Minimises ``objective(weights(logits), problem) + entropy_weight · row_entropy(W)``.

    Args:
      objective: a name of :data:`OBJECTIVES` or ``fn(W, problem) -> scalar``.
      parameterization: from :func:`row_softmax` or :func:`sinkhorn`.
      learning_rate: Adam's step size (ignored when ``tx`` is given).
      tx: any optax transformation for the logits.
      entropy_weight: ``λ >= 0``, the soft degree budget (see :func:`row_entropy`).

    Returns:
      A :class:`TopologyOptimizer`.
    """
    fn = get_objective(objective)
    if not (entropy_weight >= 0 and np.isfinite(entropy_weight)):
        raise ValueError(f"entropy_weight: must be finite and >= 0, got {entropy_weight!r}")
    tx = optax.adam(learning_rate) if tx is None else tx

    def loss(logits, problem):
        w = parameterization.weights(logits)
        value = fn(w, problem)
        if entropy_weight:
            value = value + entropy_weight * row_entropy(w)
        return value

    def init(logits: jax.Array) -> TopologyOptState:
        logits = jnp.asarray(logits)
        return TopologyOptState(logits, tx.init(logits), jnp.zeros((), jnp.int32))

    @jax.jit
    def step(state: TopologyOptState, problem: Problem) -> tuple[TopologyOptState, jax.Array]:
        value, grad = jax.value_and_grad(loss)(state.logits, problem)
        updates, opt_state = tx.update(grad, state.opt_state, state.logits)
        logits = optax.apply_updates(state.logits, updates)
        return TopologyOptState(logits, opt_state, state.count + 1), value

    def weights(state: TopologyOptState) -> jax.Array:
        return parameterization.weights(state.logits)

    return TopologyOptimizer(init, step, weights)


class OptimizeResult(NamedTuple):
    """What :func:`optimize` returns.

    Attributes:
      weights: the learned ``W`` (``[n, n]`` or ``[T, n, n]``), a numpy array.
      logits: the final logits.
      history: ``[steps]`` penalised objective before each update.
      state: the final :class:`TopologyOptState` (to continue).
    """

    weights: np.ndarray
    logits: jax.Array
    history: np.ndarray
    state: TopologyOptState


def optimize(
    objective: str | Objective,
    problems: Problem | Iterable[Problem] | Callable[[int], Problem],
    parameterization: Parameterization,
    steps: int,
    learning_rate: float = 0.05,
    *,
    init_logits: jax.Array | None = None,
    tx: optax.GradientTransformation | None = None,
    entropy_weight: float = 0.0,
    optimizer: TopologyOptimizer | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> OptimizeResult:
    """Optimises the edge weights on ``parameterization``'s support (convenience loop).

    Args:
      objective: a name of :data:`OBJECTIVES` or ``fn(W, problem) -> scalar``.
      problems: one :class:`Problem` (the same run every step), an iterable of problems,
        or ``problems(i) -> Problem`` (e.g. fresh training batches at every step, a
        stochastic objective; keep shapes fixed so the step compiles once).
      parameterization: from :func:`row_softmax` or :func:`sinkhorn`.
      steps: number of updates.
      learning_rate: Adam's step size.
      init_logits: starting logits (default ``parameterization.init()``: uniform weights).
      tx: optional optax transformation instead of Adam.
      entropy_weight: soft degree budget ``λ``.
      optimizer: a prebuilt :func:`topology_optimizer` (its jitted step is reused across
        calls, e.g. one per seed; ``objective``, ``learning_rate``, ``tx`` and
        ``entropy_weight`` are then ignored).
      callback: ``callback(i, value)`` after each update.

    Returns:
      An :class:`OptimizeResult`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: must be a non-negative integer, got {steps!r}")
    opt = optimizer or topology_optimizer(objective, parameterization, learning_rate, tx=tx,
                                          entropy_weight=entropy_weight)
    state = opt.init(parameterization.init() if init_logits is None else init_logits)
    if isinstance(problems, Problem) or callable(problems):
        fixed = problems

        def source(i: int) -> Problem:
            return fixed if isinstance(fixed, Problem) else fixed(i)
    else:
        iterator = iter(problems)

        def source(i: int) -> Problem:
            return next(iterator)
    history = []
    for i in range(steps):
        state, value = opt.step(state, source(i))
        history.append(float(value))
        if callback is not None:
            callback(i, history[-1])
    return OptimizeResult(np.asarray(opt.weights(state)), state.logits,
                          np.asarray(history), state)
