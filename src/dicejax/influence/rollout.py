"""Gated re-runs of a recorded trajectory: the one mechanism behind every influence score.

A *gate* ``α_j ∈ [0, 1]`` scales node ``j``'s local update at one step::

    θ_j^{t+½}(α) = θ_j^{t+½} + (α_j − 1)(θ_j^{t+½} − θ_j^t)      (and likewise its optimizer state)

* ``α = 1`` is the actual run (the correction is an exact zero; bit for bit when the re-run
  gossips with the run's kernel, see :func:`rerun_mixer`);
* ``α_j = 0`` drops node ``j``'s update: it gossips ``θ_j^t`` and keeps its optimizer state
  (integer leaves such as Adam's step count included) — the DICE-GT counterfactual;
* the derivative at ``α = 1`` in direction ``e_j`` is the first-order response
  ``δ = θ − θ̃`` of DICE-E (DESIGN §2.3): the tangent starts as ``W^t[:, j] v_j`` and is
  propagated by the JVP of the true step (for SGD, ``W (δ − η H δ)``).

Re-running ``r`` steps from a recorded state therefore gives the exact counterfactual (with a
0/1 gate, ``vmap``-ed over sources), forward-mode cascades (``jax.linearize`` in ``α``,
``vmap``-ed over tangents ``e_j``) and adjoint cascades (one ``jax.vjp`` in ``α``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.mixing import Mixer
from dicejax.simulate import LossFn, NodeState, Trajectory, step

PyTree = Any


# Influence re-runs carry a batch of sources (vmap), and XLA:CPU's batched row gathers make
# the sparse kernel 4-5x slower there than one dense product (dice_e r = 3, digits MLP,
# exponential graph: n = 16 0.12 s dense vs 0.44 s sparse; n = 64 2.1 s vs 11.2 s), so
# re-runs of graphs up to this many nodes gossip through the dense matrices.
DENSE_RERUN_MAX_NODES = 256


def rerun_mixer(traj: Trajectory) -> Mixer:
    """The gossip operator of influence re-runs: the run's, or its dense form (same ``W``)."""
    m = traj.mixer
    if m.indices is None or m.matrices.shape[-1] > DENSE_RERUN_MAX_NODES:
        return m
    return Mixer(m.matrices)


def gated_step(loss_fn: LossFn, traj: Trajectory, state: NodeState, batch: PyTree,
               alpha: jax.Array | None, t) -> tuple[NodeState, PyTree]:
    """One ATC step of the recorded run at local index ``t``, its updates gated by ``alpha``.

    The run's own update scales (``traj.update_scale``, e.g. attackers) are kept: the gate
    on the parameters is ``update_scale[t] * alpha`` and on the optimizer state
    ``[update_scale[t] != 0] * alpha`` (``alpha=None``: the recorded step itself).

    Returns:
      ``(state at t+1, gated half params [n, ...])``.
    """
    scale, state_scale = alpha, alpha
    if traj.update_scale is not None:
        sigma = traj.update_scale[t]
        trains = (sigma != 0).astype(sigma.dtype)
        scale = sigma if alpha is None else sigma * alpha
        state_scale = trains if alpha is None else trains * alpha
    new_state, half, _ = step(loss_fn, traj.optimizer, rerun_mixer(traj), state, batch, scale,
                              state_scale)
    return new_state, half


def state_at(traj: Trajectory, t: int) -> NodeState:
    """The recorded :class:`NodeState` at local step index ``t`` (``0 <= t <= T``)."""
    return NodeState(
        jax.tree.map(lambda x: x[t], traj.params),
        jax.tree.map(lambda x: x[t], traj.opt_states),
        jnp.asarray(traj.start_step + t, jnp.int32),
    )


def batches_at(traj: Trajectory, t: int, hops: int) -> PyTree:
    """Recorded batches of steps ``t .. t+hops-1``, leaves ``[hops, n, B, ...]``."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, t, hops, 0), traj.batches)


# cascades of at most this many later steps are unrolled (no XLA while loop)
MAX_UNROLLED_HOPS = 8


def rollout(loss_fn: LossFn, traj: Trajectory, t, hops: int, alpha: jax.Array) -> PyTree:
    """Re-runs ``hops`` steps from recorded step ``t`` with node gates ``alpha`` at step ``t``.

    Args:
      loss_fn: one node's training loss.
      traj: a recorded trajectory.
      t: local step index (may be traced).
      hops: ``r >= 1`` (static).
      alpha: ``[n]`` gates of the local updates at step ``t`` (later steps are ungated).

    Returns:
      Parameters ``θ^{t+1} .. θ^{t+r}``, leaves ``[r, n, ...]``.
    """
    state = state_at(traj, t)
    batches = batches_at(traj, t, hops)
    first = jax.tree.map(lambda x: x[0], batches)
    state, _ = gated_step(loss_fn, traj, state, first, alpha, t)
    if hops == 1:
        return jax.tree.map(lambda x: x[None], state.params)

    def body(s, xs):
        batch, u = xs
        s, _ = gated_step(loss_fn, traj, s, batch, None, u)
        return s, s.params

    rest = jax.tree.map(lambda x: x[1:], batches)
    # fully unrolled for short cascades: XLA:CPU runs convolutions inside a while loop
    # ~5x slower than outside one (benchmarks/RESULTS.md §2, finding 4)
    _, later = jax.lax.scan(body, state, (rest, t + 1 + jnp.arange(hops - 1)),
                            unroll=hops - 1 <= MAX_UNROLLED_HOPS)
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), state.params, later)


def node_losses(loss_fn: LossFn, params: PyTree, probe: PyTree, lead: int = 1) -> jax.Array:
    """Probe loss ``L(θ; z')`` of every stacked parameter set.

    Args:
      loss_fn: one node's loss.
      params: leaves with ``lead`` leading stacking axes (e.g. ``[n, ...]`` or ``[r, n, ...]``).
      probe: the probe batch ``z'``, shared by all nodes.
      lead: number of leading stacking axes.

    Returns:
      Losses with the ``lead`` leading axes (``[n]`` or ``[r, n]``).
    """
    fn = lambda p: loss_fn(p, probe)  # noqa: E731
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(params)


def shells(matrices: jax.Array) -> jax.Array:
    """Time-respecting shells of every source.

    Args:
      matrices: ``[r, n, n]``, ``W^t .. W^{t+r-1}``.

    Returns:
      ``[r, n, n]`` bool; ``out[s-1, k, j]`` is true when ``k ∈ S_s(j)``: first reached
      from ``j`` at hop ``s`` (``R_0 = {j}``,
      ``R_s = R_{s-1} ∪ {k : W^{t+s-1}[k, i] > 0, i ∈ R_{s-1}}``).
    """
    n = matrices.shape[-1]
    reach = jnp.eye(n, dtype=bool)

    def body(reach, w):
        new = reach | ((w > 0).astype(jnp.int32) @ reach.astype(jnp.int32) > 0)
        return new, new & ~reach

    _, out = jax.lax.scan(body, reach, matrices)
    return out


@functools.partial(jax.jit, static_argnums=2)
def _finite_window(params: PyTree, start, size: int) -> jax.Array:
    """True when every parameter of steps ``start .. start+size-1`` is finite (one sync)."""
    ok = [jnp.all(jnp.isfinite(jax.lax.dynamic_slice_in_dim(x, start, size, 0)))
          for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(ok))


def check_query(
    traj: Trajectory, probe: PyTree, step: int, hops: int, node_weights, loss_fn: LossFn
) -> jax.Array:
    """Validates an influence query; returns the node weights ``q`` ``[n]``."""
    if not isinstance(traj, Trajectory):
        raise ValueError(f"traj: must be a Trajectory from dicejax.simulate, got {type(traj)}")
    if not traj.recorded:
        raise ValueError("traj: was run with record=False; influence needs record=True")
    T, n = traj.num_steps, traj.num_nodes
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or not 0 <= step < T:
        raise ValueError(f"step: must be an integer in [0, {T}), got {step!r}")
    if isinstance(hops, bool) or not isinstance(hops, int | np.integer) or hops < 1:
        raise ValueError(f"hops: must be a positive integer, got {hops!r}")
    if step + hops > T:
        raise ValueError(
            f"hops: step + hops = {step + hops} exceeds the trajectory's T = {T} steps"
        )
    if not bool(_finite_window(traj.params, step, hops + 1)):
        raise ValueError(f"traj: non-finite parameters between steps {step} and {step + hops}")
    one = jax.tree.map(lambda x: x[0, 0], traj.params)
    try:
        out = jax.eval_shape(loss_fn, one, probe)
    except Exception as e:
        raise ValueError(f"probe: loss_fn(params, probe) failed for this probe: {e}") from e
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"probe: loss_fn(params, probe) must be a scalar, got shape "
            f"{getattr(out, 'shape', None)}"
        )
    probe_leaves = jax.tree.leaves(probe)
    if any(jnp.size(x) == 0 for x in probe_leaves):
        raise ValueError("probe: is empty; give at least one example")
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in probe_leaves
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact)):
        raise ValueError("probe: contains non-finite values (NaN or Inf)")
    if node_weights is None:
        return jnp.full((n,), 1.0 / n, dtype=jnp.result_type(float))
    try:
        q = jnp.asarray(node_weights)
    except TypeError as e:
        raise ValueError(f"node_weights: must be a numeric array [n], got {node_weights!r}") from e
    if q.shape != (n,):
        raise ValueError(f"node_weights: must have shape ({n},), got {q.shape}")
    if not bool(jnp.all(jnp.isfinite(q))) or bool(jnp.any(q < 0)):
        raise ValueError("node_weights: must be finite and non-negative")
    return q
