"""Influence over whole runs and within batches.

* :func:`ledger` — DICE-E of every node at every step (or a stride of steps) in one jitted
  pass, accumulated per node, plus the accumulated proximal-influence matrix.
* :func:`trajectory_attribution` — the exact linearised effect of every (node, step) local
  update on the final probe objective ``Σ_k q_k L(θ_k^T; z')``, from ONE reverse pass through
  the whole re-run (``lax.scan`` with ``jax.checkpoint``, so memory stays bounded).
* :func:`dice_e_per_sample` — the first-order DICE-E score of each sample in a source's batch.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence.cascade import compute_e_cascade, network_objective
from dicejax.influence.proximal import compute_proximal
from dicejax.influence.rerun import (
    MAX_UNROLLED_HOPS,
    batches_at,
    check_query,
    check_step,
    float_dtype,
    gates_at,
    probe_losses,
    probe_vars,
    rerun_simulator,
    shells,
    tree_at,
    tree_dot,
)
from dicejax.simulator import Gate, LossFn, NodeState, run
from dicejax.trajectory import Trajectory

PyTree = Any


class Ledger(NamedTuple):
    """Influence accumulated over a run.

    Attributes:
      steps: ``[S]`` the scored steps.
      scores: ``[S, n]`` DICE-E^(r) of every node at each scored step (negative = helpful).
      network: ``[S, n]`` network-level first-order influence at horizon ``r`` (adjoint).
      proximal: ``[n, n]`` proximal influence ``P^t[k, j]`` summed over the scored steps.
    """

    steps: jax.Array
    scores: jax.Array
    network: jax.Array
    proximal: jax.Array

    @property
    def total(self) -> jax.Array:
        """``[n]``: each node's summed DICE-E score over the scored steps."""
        return jnp.sum(self.scores, axis=0)

    @property
    def network_total(self) -> jax.Array:
        """``[n]``: each node's summed network-level influence over the scored steps."""
        return jnp.sum(self.network, axis=0)


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops", "batch_size"))
def _ledger(loss_fn, traj, probe, steps, q, *, hops, batch_size):
    ones = jnp.ones(q.shape, q.dtype)

    def one(t):
        cas = compute_e_cascade(loss_fn, traj, probe, t, q, jnp.arange(q.shape[0]), hops=hops,
                                order=1, direct="taylor", batch_size=batch_size)
        net = jax.grad(network_objective(loss_fn, traj, probe, t, hops, q))(ones)
        return cas.total, net, compute_proximal(loss_fn, traj, probe, t, q)

    scores, network, prox = jax.lax.map(one, steps)
    return Ledger(steps, scores, network, jnp.sum(prox, axis=0))


def ledger(loss_fn: LossFn, traj: Trajectory, probe: PyTree, hops: int = 1,
           node_weights: jax.Array | None = None, *, start: int = 0, stop: int | None = None,
           stride: int = 1, batch_size: int | None = None) -> Ledger:
    """DICE-E of every node at every ``stride``-th step, in one jitted pass.

    Args:
      loss_fn: one node's loss.
      traj: recorded trajectory.
      probe: probe batch ``z'``.
      hops: ``r`` for the per-step scores and the network reading.
      node_weights: ``q`` (default ``1/n``).
      start: first scored step (local index).
      stop: one past the last scored step (local; default and at most ``T − r + 1``).
      stride: score steps ``start, start + stride, ...`` below ``stop``.
      batch_size: sources per forward cascade batch (bounds memory).

    Returns:
      A :class:`Ledger` (``steps`` are local indices).
    """
    q = check_query(traj, probe, start, hops, node_weights, loss_fn)
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride: must be a positive integer, got {stride!r}")
    last = traj.num_steps - hops + 1
    stop = last if stop is None else check_step(stop, "stop", traj.num_steps, stop=True)
    if not start < stop <= last:
        raise ValueError(f"stop: must lie in ({start}, {last}] (the last scored step needs "
                         f"{hops} later steps), got {stop}")
    steps = jnp.arange(start, stop, stride)
    return _ledger(loss_fn, traj, probe, steps, q.astype(float_dtype(traj)), hops=hops,
                   batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "remat"))
def _attribution(loss_fn, traj, probe, q, *, remat):
    T, n = traj.num_steps, traj.num_nodes
    sim = rerun_simulator(loss_fn, traj)
    own = gates_at(traj, 0, T)

    def objective(alphas):
        gates = (Gate(alphas, alphas) if own is None
                 else Gate(own.update * alphas, own.state * alphas))
        final, _ = run(sim, traj.state_at(0), traj.batches, gates, remat=remat)
        return jnp.dot(q, probe_losses(sim, probe_vars(final), probe))

    return jax.grad(objective)(jnp.ones((T, n), q.dtype))


def trajectory_attribution(loss_fn: LossFn, traj: Trajectory, probe: PyTree,
                           node_weights: jax.Array | None = None, *,
                           remat: bool = True) -> jax.Array:
    """Linearised influence of every (step, node) update on the final probe objective.

    ``A[t, j] = d/dα_j^t Σ_k q_k L(θ_k^T; z')`` at ``α = 1``, where ``α_j^t`` gates node ``j``'s
    local update at step ``t``: the first-order estimate of how much the final objective
    would rise had ``z_j^t`` been removed, negated (negative = helpful). It equals
    ``dice_e_network(step=t, horizon=T − t)`` for every ``t`` — all of them from a single
    reverse pass through the re-run, with the scan body rematerialised (``remat=True``) so
    memory is ``O(T · n · P)`` for the inputs only, not the activations.

    Args:
      loss_fn: one node's loss.
      traj: recorded trajectory (its batches, ``θ^0`` and optimizer state are re-run).
      probe: probe batch ``z'``.
      node_weights: ``q`` (default ``1/n``).
      remat: rematerialise the step in the backward pass.

    Returns:
      ``[T, n]``.
    """
    q = check_query(traj, probe, 0, traj.num_steps, node_weights, loss_fn)
    return _attribution(loss_fn, traj, probe, q.astype(float_dtype(traj)), remat=remat)


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops"))
def _per_sample(loss_fn, traj, probe, t, q, *, hops):
    n = q.shape[0]
    sim = rerun_simulator(loss_fn, traj)
    state = traj.state_at(t)
    batch = tree_at(batches_at(traj, t, 1), 0)  # [n, B, ...]
    half = tree_at(traj.half_params, t)
    opt_next = tree_at(traj.opt_states, t + 1)
    mask = shells(traj.matrices_from(t, hops))  # [r, k, j]

    def forward(h, s):
        """Gossip of gated halves at t, then r − 1 recorded steps: probe losses [r, n]."""
        st = NodeState(sim.mixer.apply(state.step, h), s, state.step + 1)
        params = jax.tree.map(lambda x: x[None], st.params)
        if hops > 1:
            _, outs = run(sim, st, batches_at(traj, t + 1, hops - 1),
                          gates_at(traj, t + 1, hops - 1), record=True,
                          unroll=hops - 1 <= MAX_UNROLLED_HOPS)
            params = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), params,
                                  outs.state.params)
        return probe_losses(sim, (params, None), probe, lead=2)

    _, vjp = jax.vjp(forward, half, opt_next)

    def sensitivity(j):  # cotangents of (half, opt state) for source j, restricted to shells
        ct = jnp.where(mask[:, :, j], q[None, :], 0).astype(q.dtype)
        return vjp(ct)

    a, b = jax.vmap(sensitivity)(jnp.arange(n))  # leaves [j, n, ...]
    a = jax.tree.map(lambda x: x[jnp.arange(n), jnp.arange(n)], a)  # node j's own slot
    b = jax.tree.map(lambda x: x[jnp.arange(n), jnp.arange(n)], b)
    g0 = jax.vmap(jax.grad(lambda p: loss_fn(p, probe)))(state.params)
    a = jax.tree.map(lambda x, g: x + q.reshape((-1,) + (1,) * (g.ndim - 1)) * g, a, g0)

    def node_scores(theta, opt, batch_j, a_j, b_j):
        B = jax.tree.leaves(batch_j)[0].shape[0]
        grads = jax.vmap(lambda z: jax.grad(loss_fn)(
            theta, jax.tree.map(lambda x: x[None], z)))(batch_j)  # [B, ...] per-sample
        g = jax.tree.map(lambda x: jnp.mean(x, axis=0), grads)

        def update(grad):
            upd, new_opt = traj.optimizer.update(grad, opt, theta)
            return upd, new_opt

        _, lin = jax.linearize(update, g)

        def score(gi):
            du, ds = lin(jax.tree.map(lambda x: x / B, gi))
            return tree_dot(a_j, du, lead=0) + tree_dot(b_j, ds, lead=0)

        return jax.vmap(score)(grads)

    return jax.vmap(node_scores)(state.params, state.opt_state, batch, a, b)


def dice_e_per_sample(loss_fn: LossFn, traj: Trajectory, probe: PyTree, step: int, hops: int = 1,
               node_weights: jax.Array | None = None) -> jax.Array:
    """First-order DICE-E^(r) score of every sample in every source's batch at step ``t``.

    The source's update is split over its samples through the linearised optimizer update,
    ``(δθ_i, δs_i) = J_O(g) · ∇ℓ_i / B``; each part is pushed through the same shells as the
    batch (reverse mode, one VJP per source). For optimizers whose update is linear in the
    gradient (plain SGD) the scores sum exactly to ``dice_e(..., order=1)``; for others
    (momentum, Adam) they are the linearised split and need not sum to the batch score.

    Args:
      loss_fn: one node's loss; must be the mean of per-sample losses.
      traj, probe, step, hops, node_weights: as in :func:`dicejax.influence.dice_e`.

    Returns:
      ``[n, B]``: score of sample ``i`` of source ``j`` (negative = helpful).
    """
    q = check_query(traj, probe, step, hops, node_weights, loss_fn)
    sim = traj.simulator
    if sim.stateful or sim.rng or sim.has_aux:
        raise ValueError("traj: per-sample scores need a plain loss_fn(params, batch) -> loss "
                         "(no model state, PRNG key or aux output: a batch's statistics or "
                         "dropout masks do not split over its samples)")
    return _per_sample(loss_fn, traj, probe, jnp.asarray(step), q.astype(float_dtype(traj)),
                       hops=hops)


def per_sample(*args, **kwargs) -> jax.Array:
    """Deprecated name of :func:`dice_e_per_sample`."""
    warnings.warn("per_sample is deprecated; use dice_e_per_sample", DeprecationWarning,
                  stacklevel=2)
    return dice_e_per_sample(*args, **kwargs)

