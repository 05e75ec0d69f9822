"""DICE-GT and DICE-E for every source node at once (DESIGN §2.2–2.4).

Sign convention: an influence is a change in probe loss caused by the source's update;
negative means the data **helped** (it lowered the probe loss).

Both are computed as a :class:`Cascade`: the source's direct term ``[n]`` plus, for every hop
``s = 1..r``, the matrix ``C_s[k, j]`` of the effect of source ``j``'s update on node ``k``'s
probe loss at step ``t+s`` (weighted by ``q_k``), and the time-respecting shells. The paper's
scores (Definitions 2–3, Proposition 1, Theorem 1) and the network-level reading are
reductions of that one object. Cost for all ``n`` sources and ``r`` hops:

* ground truth: ``n + 1`` gated re-runs of ``r`` steps (``vmap``-ed);
* forward estimate: one linearisation of the ``r``-step re-run, its linear map applied to the
  ``n`` unit gates (``vmap``); walks are never enumerated;
* adjoint estimate of the network-level reading: one ``jax.vjp`` of the re-run (``O(r)``
  vmapped HVPs for every source at once).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from dicejax.influence.rerun import (
    check_query,
    float_dtype,
    probe_grads,
    probe_losses,
    probe_vars,
    rerun,
    rerun_simulator,
    shells,
    tree_at,
    tree_dot,
)
from dicejax.simulator import LossFn
from dicejax.trajectory import Trajectory

PyTree = Any


class Cascade(NamedTuple):
    """Influence of every source node's update at one step, hop by hop.

    Attributes:
      direct: ``[n]`` the source's effect on its own probe loss at ``t+½``, ``q_j (...)``.
      matrix: ``[r, n, n]``; ``matrix[s-1, k, j] = q_k [L(θ_k^{t+s}) − L(θ̃_k^{t+s}(j))]``
        (exact, or its estimate) — who influences whom at hop ``s``.
      shells: ``[r, n, n]`` bool; ``shells[s-1, k, j]``: ``k`` first reached from ``j`` at
        hop ``s``.
    """

    direct: jax.Array
    matrix: jax.Array
    shells: jax.Array

    @property
    def hops(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def per_hop(self) -> jax.Array:
        """``[r, n]``: ``Σ_{k ∈ S_s(j)} matrix[s-1, k, j]`` for each hop ``s`` and source ``j``."""
        return jnp.sum(jnp.where(self.shells, self.matrix, 0), axis=1)

    @property
    def total(self) -> jax.Array:
        """``[n]``: the r-hop DICE score of every source (direct term + every shell)."""
        return self.direct + jnp.sum(self.per_hop, axis=0)

    def network(self, hops: int | None = None, *, horizon: int | None = None) -> jax.Array:
        """``[n]``: ``Σ_k matrix[h-1, k, j]``, the effect on all nodes at step ``t+h``.

        Args:
          hops: ``h`` in ``[1, r]`` (default ``r``); ``horizon=`` is its deprecated name.
        """
        hops = _renamed_horizon(hops, horizon, None)
        h = self.hops if hops is None else hops
        if not 1 <= h <= self.hops:
            raise ValueError(f"hops: must be in [1, {self.hops}], got {h}")
        return jnp.sum(self.matrix[h - 1], axis=0)


def _renamed_horizon(hops, horizon, default):
    """``horizon=`` is the deprecated name of ``hops=`` (one name for the idea)."""
    if horizon is None:
        return default if hops is None else hops
    warnings.warn("horizon= is deprecated; use hops= (the same number of later steps)",
                  DeprecationWarning, stacklevel=3)
    if hops is not None and hops != horizon:
        raise ValueError(f"hops and horizon: give one of them, got {hops} and {horizon}")
    return horizon


# ``batch_size`` splits the sources into at most this many chunks unrolled in one program;
# more chunks run as a ``lax.map`` loop (bounded compile time)
MAX_UNROLLED_CHUNKS = 32


def map_sources(fn, xs, batch_size: int | None):
    """``vmap`` of ``fn`` over ``xs``: all at once, or in chunks of ``batch_size``.

    Chunks bound memory. Up to :data:`MAX_UNROLLED_CHUNKS` chunks are unrolled one after the
    other in the program rather than looped with ``lax.map``: XLA:CPU runs convolutions
    inside a while loop 4-6x slower than outside one (benchmarks/RESULTS.md §2, finding 4).
    """
    m = jax.tree.leaves(xs)[0].shape[0]
    if batch_size is None or batch_size >= m:
        return jax.vmap(fn)(xs)
    if -(-m // batch_size) > MAX_UNROLLED_CHUNKS:
        return jax.lax.map(fn, xs, batch_size=batch_size)
    parts = [jax.vmap(fn)(jax.tree.map(lambda x, s=s: x[s : s + batch_size], xs))
             for s in range(0, m, batch_size)]
    return jax.tree.map(lambda *p: jnp.concatenate(p), *parts)


def half_vars(traj: Trajectory, t) -> tuple[PyTree, PyTree]:
    """``(θ^{t+½}, s^{t+½})``: the probe variables right after the local updates of step
    ``t`` (before gossip)."""
    ms = None if traj.half_model_states is None else tree_at(traj.half_model_states, t)
    return tree_at(traj.half_params, t), ms


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops", "batch_size"))
def compute_gt_cascade(loss_fn, traj, probe, t, q, *, hops, batch_size):
    """The unvalidated core of :func:`gt_cascade` (``t`` may be traced)."""
    n = q.shape[0]
    dtype = float_dtype(traj)
    sim = rerun_simulator(loss_fn, traj)
    alphas = jnp.concatenate([jnp.ones((1, n), dtype), 1 - jnp.eye(n, dtype=dtype)])

    def losses(alpha):  # [r, n]
        return probe_losses(sim, probe_vars(rerun(loss_fn, traj, t, hops, alpha)), probe, lead=2)

    L = map_sources(losses, alphas, batch_size)  # [n+1 (actual, then source j), r, k]
    diff = jnp.transpose(L[0][None] - L[1:], (1, 2, 0))  # [r, k, j]
    before = probe_losses(sim, probe_vars(traj.state_at(t)), probe)
    after = probe_losses(sim, half_vars(traj, t), probe)
    return Cascade(q * (after - before), q[None, :, None] * diff,
                   shells(traj.matrices_from(t, hops)))


def gt_cascade(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    *,
    batch_size: int | None = None,
) -> Cascade:
    """Exact DICE-GT cascade: counterfactual re-runs with each source's update removed.

    Removing ``z_j^t``: node ``j`` gossips ``θ_j^t`` instead of ``θ_j^{t+½}`` at step ``t`` and
    keeps its optimizer state; steps ``t+1 .. t+r-1`` are re-run with everything else fixed.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` for one node (training and probe loss).
      traj: a trajectory recorded by :func:`dicejax.simulate` (``record=True``).
      probe: the probe batch ``z'`` shared by all nodes.
      step: local step index ``t`` (``0 <= t``, ``t + hops <= T``).
      hops: ``r >= 1``.
      node_weights: ``q`` ``[n]`` (default uniform ``1/n``).
      batch_size: re-run this many sources at a time (default: all ``n + 1`` at once).

    Returns:
      A :class:`Cascade`; ``.total`` is DICE-GT^(r), ``.network(h)`` the network-level reading.
    """
    q = check_query(traj, probe, step, hops, node_weights, loss_fn)
    return compute_gt_cascade(
        loss_fn,
        traj,
        probe,
        jnp.asarray(step),
        q.astype(float_dtype(traj)),
        hops=hops,
        batch_size=batch_size,
    )


def slope_and_curvature(sim, variables, tangent, probe, *, lead: int, sign: int) -> jax.Array:
    """``g·u + sign · ½ uᵀHu`` of every stacked node's probe loss along ``u``.

    ``g`` and ``H`` are the probe-loss gradient and Hessian at ``variables``; both terms are
    the first and second derivatives of ``ε ↦ L(v + εu)`` at 0 (a jvp of a jvp).

    Args:
      sim: the simulator (its loss form).
      variables, tangent: stacked ``(params, model_state)`` pairs with ``lead`` leading axes.

    Returns:
      ``[*lead]`` values.
    """

    def slope(v):
        return jax.jvp(lambda a: probe_losses(sim, a, probe, lead=lead), (v,), (tangent,))[1]

    d1, d2 = jax.jvp(slope, (variables,), (tangent,))
    return d1 + sign * 0.5 * d2


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops", "order", "direct", "batch_size"))
def compute_e_cascade(loss_fn, traj, probe, t, q, *, hops, order, direct, batch_size):
    """The unvalidated core of :func:`e_cascade` (``t`` may be traced)."""
    n = q.shape[0]
    dtype = float_dtype(traj)
    sim = rerun_simulator(loss_fn, traj)
    ones, eye = jnp.ones((n,), dtype), jnp.eye(n, dtype=dtype)
    theta, half = probe_vars(traj.state_at(t)), half_vars(traj, t)
    v = jax.tree.map(jnp.subtract, half, theta)
    # one linearisation of the r-step re-run in the gates; its linear map is applied to the
    # n unit gates (vmap), giving every source's perturbation δ [r, n, ...]
    actual, lin = jax.linearize(lambda a: probe_vars(rerun(loss_fn, traj, t, hops, a)), ones)
    if order == 1:
        # the probe gradients once per (hop, node) [r, n, ...], not per source
        g = probe_grads(sim, actual, probe, lead=2)

        def response_of(e):
            return tree_dot(g, lin(e), lead=2)
    else:
        # g·δ and δᵀH'δ as the first and second directional derivatives of every observer's
        # probe loss along δ (forward over forward: no backward pass through the probe,
        # ~8x cheaper than a Hessian-vector product for the CNN on CPU)
        def response_of(e):
            return slope_and_curvature(sim, actual, lin(e), probe, lead=2, sign=-1)

    response = map_sources(response_of, eye, batch_size)  # [j, r, k] = g_k · δ_k(j) (+ curv.)
    matrix = q[None, :, None] * jnp.transpose(response, (1, 2, 0))

    if direct == "exact":
        own = probe_losses(sim, half, probe) - probe_losses(sim, theta, probe)
    elif order == 1:
        own = tree_dot(probe_grads(sim, theta, probe), v)
    else:
        own = slope_and_curvature(sim, theta, v, probe, lead=1, sign=1)
    return Cascade(q * own, matrix, shells(traj.matrices_from(t, hops)))


def e_cascade(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    *,
    order: Literal[1, 2] = 1,
    direct: Literal["taylor", "exact"] = "taylor",
    batch_size: int | None = None,
) -> Cascade:
    """DICE-E cascade: first-order responses ``g_k^{t+s} · δ_k^{t+s}(j)`` of every source.

    ``δ`` starts as ``W^t[:, j] v_j`` and follows the JVP of the true step (for SGD,
    ``δ ← W (δ − η H δ)`` with each node's own training Hessian), so any optax optimizer works.

    Args:
      loss_fn, traj, probe, step, hops, node_weights, batch_size: as in :func:`gt_cascade`.
      order: 1 (the paper's estimator) or 2, which adds the probe-loss curvature terms
        ``½ vᵀH'v`` to the direct term and ``−½ δᵀH'δ`` at each observer (each a jvp of a jvp
        of the probe loss: forward mode, no HVP).
      direct: ``"taylor"`` (``g_j^t · v_j``, the paper's form) or ``"exact"``
        (``L(θ_j^{t+½}) − L(θ_j^t)``, two forward passes at the source).

    Returns:
      A :class:`Cascade`; ``.total`` is DICE-E^(r).
    """
    q = check_query(traj, probe, step, hops, node_weights, loss_fn)
    if order not in (1, 2):
        raise ValueError(f"order: must be 1 or 2, got {order!r}")
    if direct not in ("taylor", "exact"):
        raise ValueError(f"direct: must be 'taylor' or 'exact', got {direct!r}")
    return compute_e_cascade(
        loss_fn,
        traj,
        probe,
        jnp.asarray(step),
        q.astype(float_dtype(traj)),
        hops=hops,
        order=order,
        direct=direct,
        batch_size=batch_size,
    )


def dice_gt(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """DICE-GT^(r)(j, t) of every source node ``j``: ``[n]`` (negative = helpful).

    See :func:`gt_cascade` for the arguments.
    """
    return gt_cascade(loss_fn, traj, probe, step, hops, node_weights, batch_size=batch_size).total


def dice_e(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    *,
    order: Literal[1, 2] = 1,
    direct: Literal["taylor", "exact"] = "taylor",
    batch_size: int | None = None,
) -> jax.Array:
    """DICE-E^(r)(j, t) of every source node ``j``: ``[n]`` (negative = helpful).

    See :func:`e_cascade` for the arguments.
    """
    return e_cascade(
        loss_fn,
        traj,
        probe,
        step,
        hops,
        node_weights,
        order=order,
        direct=direct,
        batch_size=batch_size,
    ).total


def dice_gt_network(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int | None = None,
    node_weights: jax.Array | None = None,
    *,
    batch_size: int | None = None,
    horizon: int | None = None,
) -> jax.Array:
    """Exact network-level influence ``Σ_k q_k [L(θ_k^{t+h}) − L(θ̃_k^{t+h})]``: ``[n]``.

    Args:
      loss_fn, traj, probe, step, node_weights, batch_size: as in :func:`gt_cascade`.
      hops: ``h >= 1``, the number of later steps (default 1); ``horizon=`` is its
        deprecated name.
    """
    hops = _renamed_horizon(hops, horizon, 1)
    return gt_cascade(
        loss_fn, traj, probe, step, hops, node_weights, batch_size=batch_size
    ).network()


def network_objective(loss_fn: LossFn, traj: Trajectory, probe: PyTree, t, hops: int,
                      q: jax.Array):
    """``α ↦ Σ_k q_k L(θ_k^{t+h}(α); z')``: the probe objective ``h`` steps after the gates
    ``α`` ``[n]`` at local step ``t`` (its gradient at ``α = 1`` is the adjoint estimate)."""
    sim = rerun_simulator(loss_fn, traj)

    def objective(alpha):
        last = rerun(loss_fn, traj, t, hops, alpha, every_step=False)
        return jnp.dot(q, probe_losses(sim, probe_vars(last), probe))

    return objective


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops"))
def compute_e_network(loss_fn, traj, probe, t, q, *, hops):
    """The unvalidated core of :func:`dice_e_network` (``t`` may be traced)."""
    ones = jnp.ones(q.shape, float_dtype(traj))
    return jax.grad(network_objective(loss_fn, traj, probe, t, hops, q))(ones)


def dice_e_network(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int | None = None,
    node_weights: jax.Array | None = None,
    *,
    horizon: int | None = None,
) -> jax.Array:
    """First-order network-level influence of every source, ``h`` steps later: ``[n]``.

    Computed by one adjoint sweep (reverse mode through the ``h``-step re-run):
    ``λ ← J_stepᵀ λ`` from ``λ^{t+h} = q ⊙ g^{t+h}``, then ``⟨λ_j, v_j⟩`` for every source.
    Equals ``e_cascade(..., hops=h).network()`` at a cost independent of ``n`` sources.

    Args:
      loss_fn, traj, probe, step, node_weights: as in :func:`e_cascade`.
      hops: ``h >= 1`` (default 1); ``horizon=`` is its deprecated name.
    """
    hops = _renamed_horizon(hops, horizon, 1)
    q = check_query(traj, probe, step, hops, node_weights, loss_fn)
    return compute_e_network(
        loss_fn, traj, probe, jnp.asarray(step), q.astype(float_dtype(traj)), hops=hops
    )
