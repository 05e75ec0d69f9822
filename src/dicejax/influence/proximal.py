"""Proximal influence (Definition 4) and reciprocity (Definition 5).

The proximal influence of in-neighbour ``j`` on node ``k`` at step ``t`` is what ``k`` can
compute locally::

    P^t[k, j] = q_k W^t[k, j] g_k^{t+1} · v_j^t,     g_k^{t+1} = ∇L(θ_k^{t+1}; z')

(for SGD ``−η q_k W^t[k, j] ∇L(θ_j^t; z_j^t) · ∇L(θ_k^{t+1}; z')``). It is the first hop of the
DICE-E cascade, ``e_cascade(...).matrix[0]``, computed here with one ``[n, P] × [P, n]``
product. Negative = ``j``'s update helped ``k``.

With ``weighted=False`` the mixing weight is left out: ``q_k g_k^{t+1} · v_j^t`` for *every*
pair, i.e. what ``k``'s probe loss would gain from ``j``'s update per unit of weight. Node
``k`` can compute it for any node whose update it sees, whether or not it currently mixes
it in — the quantity collaborator selection (:mod:`dicejax.apps.collaborators`) ranks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence.cascade import half_vars
from dicejax.influence.rerun import (
    check_query,
    check_step,
    float_dtype,
    probe_grads,
    probe_vars,
    rerun_simulator,
)
from dicejax.simulator import LossFn
from dicejax.trajectory import Trajectory

PyTree = Any


def _flat(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def _dots(a: PyTree, b: PyTree) -> jax.Array:
    """``[k, j]``: ``a_k · b_j`` of two node-stacked pytrees (float leaves), one product."""
    pairs = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
             if jnp.issubdtype(jnp.result_type(y), jnp.inexact)]
    if not pairs:
        return 0.0
    xs, ys = zip(*pairs, strict=True)
    return jnp.matmul(_flat(list(xs)), _flat(list(ys)).T, precision=jax.lax.Precision.HIGHEST)


def _support_dots(a: PyTree, b: PyTree, indices: jax.Array) -> jax.Array:
    """``[k, d]``: ``a_k · b_{indices[k, d]}`` (0 at padded slots): the in-neighbour pairs
    only, one row gather per slot."""
    n, width = indices.shape
    out = jnp.zeros((n, width), jnp.result_type(*jax.tree.leaves(a)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if not jnp.issubdtype(jnp.result_type(y), jnp.inexact):
            continue
        cols = [jnp.sum((x * jnp.take(y, indices[:, d], axis=0, mode="fill", fill_value=0)
                         ).reshape(n, -1), axis=1) for d in range(width)]
        out = out + jnp.stack(cols, axis=1).astype(out.dtype)
    return out


#: The weighted proximal influence of graphs above this many nodes with a neighbour list is
#: computed on the in-neighbour pairs only (``O(n·D·P)``), not as an ``[n, P] × [P, n]``
#: product (``O(n²·P)``).
SUPPORT_MIN_NODES = 256


@functools.partial(jax.jit, static_argnames=("loss_fn", "weighted"))
def compute_proximal(loss_fn, traj, probe, t, q, weighted=True):
    """The unvalidated core of :func:`proximal` (``t`` may be traced)."""
    sim = rerun_simulator(loss_fn, traj)
    (theta, s_theta), (half, s_half) = probe_vars(traj.state_at(t)), half_vars(traj, t)
    g, g_state = probe_grads(sim, probe_vars(traj.state_at(t + 1)), probe)
    mixer = traj.mixer
    n = q.shape[0]
    if weighted and mixer.indices is not None and n > SUPPORT_MIN_NODES:
        idx = mixer.indices
        dots = _support_dots(g, jax.tree.map(jnp.subtract, half, theta), idx)  # [k, d]
        own = 0.0
        if sim.stateful:
            ds_theta = jax.tree.map(jnp.subtract, s_half, s_theta)
            if sim.gossip_model_state:
                dots = dots + _support_dots(g_state, ds_theta, idx)
            else:
                own = _support_dots(g_state, ds_theta, jnp.arange(n)[:, None])[:, 0]
        w = mixer.weights[0] if mixer.period == 1 else mixer.weights[
            (traj.start_step + t) % mixer.period]
        vals = q[:, None] * w.astype(dots.dtype) * dots
        out = jnp.zeros((n, n + 1), dots.dtype).at[jnp.arange(n)[:, None], idx].add(vals)
        return out[:, :n] + jnp.diag(q * own)
    dots = _dots(g, jax.tree.map(jnp.subtract, half, theta))  # [k, j]
    own = None
    if sim.stateful:  # the model-state change travels with the gossip, or stays at j
        ds = _dots(g_state, jax.tree.map(jnp.subtract, s_half, s_theta))
        if sim.gossip_model_state:
            dots = dots + ds
        else:
            own = jnp.diag(jnp.diagonal(ds))
    if weighted:
        out = q[:, None] * traj.matrix_at(t).astype(dots.dtype) * dots
    else:
        out = q[:, None] * dots
    return out if own is None else out + q[:, None] * own.astype(dots.dtype)


@functools.partial(jax.jit, static_argnames=("loss_fn", "weighted"))
def _window(loss_fn, traj, probe, steps, q, weighted):
    return jax.lax.map(lambda t: compute_proximal(loss_fn, traj, probe, t, q, weighted), steps)


def proximal(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    node_weights: jax.Array | None = None,
    *,
    weighted: bool = True,
) -> jax.Array:
    """Proximal influence of every in-neighbour on every node at step ``t``.

    Args:
      loss_fn: one node's loss.
      traj: recorded trajectory.
      probe: probe batch ``z'``.
      step: local step index ``t`` (``t + 1 <= T``).
      node_weights: ``q`` ``[n]`` (default ``1/n``).
      weighted: include the mixing weight ``W^t[k, j]`` (Definition 4); ``False`` gives the
        per-unit-weight influence ``q_k g_k^{t+1} · v_j`` of every node on every node.

    Returns:
      ``[n, n]``; ``[k, j]`` is ``q_k W^t[k, j] g_k^{t+1} · v_j`` (zero where ``W^t[k, j] = 0``;
      the diagonal is a node's effect on itself through its self-weight).
    """
    q = check_query(traj, probe, step, 1, node_weights, loss_fn)
    return compute_proximal(loss_fn, traj, probe, jnp.asarray(step),
                            q.astype(float_dtype(traj)), bool(weighted))


def proximal_steps(loss_fn: LossFn, traj: Trajectory, probe: PyTree,
                   node_weights: jax.Array | None = None, *, start: int = 0,
                   stop: int | None = None, stride: int = 1, weighted: bool = True) -> jax.Array:
    """Proximal influence at every step of a window, in one jitted pass.

    Args:
      loss_fn: one node's loss.
      traj: recorded trajectory (``record=True``).
      probe: probe batch ``z'``.
      node_weights: ``q`` ``[n]`` (default ``1/n``).
      start: first step (local index, ``0 <= start < T``).
      stop: one past the last step (local, default ``T``).
      stride: score every ``stride``-th step (``start, start + stride, ...``).
      weighted: see :func:`proximal`.

    Returns:
      ``[S, n, n]`` with ``S = ceil((stop − start) / stride)``; entry ``[s, k, j]`` is
      :func:`proximal` at step ``start + s · stride``.
    """
    start = check_step(start, "start", traj.num_steps)
    stop = traj.num_steps if stop is None else stop
    if isinstance(stop, bool) or not isinstance(stop, int | np.integer) or stop <= start:
        raise ValueError(f"stop: must be an integer above start={start}, got {stop!r}")
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride: must be a positive integer, got {stride!r}")
    q = check_query(traj, probe, start, stop - start, node_weights, loss_fn)
    return _window(loss_fn, traj, probe, jnp.arange(start, stop, stride),
                   q.astype(float_dtype(traj)), bool(weighted))


def reciprocity(prox: jax.Array, eps: float = 0.0) -> jax.Array:
    """Pairwise reciprocity ``R[k, j] = P[k, j] / P[j, k]`` (Definition 5).

    How much ``k`` gains from ``j`` over how much ``j`` gains from ``k``. Entries where
    either direction is missing (zero) are NaN.

    Args:
      prox: ``[n, n]`` proximal influence (one step or accumulated over a window).
      eps: pairs with ``|P[j, k]| <= eps`` are NaN.

    Returns:
      ``[n, n]``.
    """
    prox = jnp.asarray(prox)
    _check_square(prox)
    back = prox.T
    ok = (jnp.abs(back) > eps) & (prox != 0)
    return jnp.where(ok, prox / jnp.where(ok, back, 1), jnp.nan)


def neighbourhood_factor(prox: jax.Array) -> jax.Array:
    """Out-going over in-coming proximal influence of each node (Definition 5).

    ``F_j = Σ_{k≠j} P[k, j] / Σ_{k≠j} P[j, k]``: above 1, ``j`` gives its neighbourhood more
    (loss change) than it receives.

    Args:
      prox: ``[n, n]`` proximal influence.

    Returns:
      ``[n]`` (NaN where node ``j`` receives nothing).
    """
    prox = jnp.asarray(prox)
    _check_square(prox)
    off = prox * (1 - jnp.eye(prox.shape[0], dtype=prox.dtype))
    out, inc = off.sum(axis=0), off.sum(axis=1)
    return jnp.where(inc != 0, out / jnp.where(inc != 0, inc, 1), jnp.nan)


def _check_square(prox) -> None:
    if prox.ndim != 2 or prox.shape[0] != prox.shape[1]:
        raise ValueError(f"prox: must be a square [n, n] matrix, got shape {prox.shape}")
