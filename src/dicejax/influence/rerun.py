"""Gated re-runs of a recorded trajectory: the one mechanism behind every influence score.

A *gate* ``α_j ∈ [0, 1]`` scales node ``j``'s local update at one step::

    θ_j^{t+½}(α) = θ_j^{t+½} + (α_j − 1)(θ_j^{t+½} − θ_j^t)      (and likewise its optimizer state)

* ``α = 1`` is the actual run (the correction is an exact zero; bit for bit when the re-run
  gossips with the run's kernel, see :func:`rerun_simulator`);
* ``α_j = 0`` drops node ``j``'s update: it gossips ``θ_j^t`` and keeps its optimizer (and
  model) state, integer leaves such as Adam's step count included — the DICE-GT
  counterfactual;
* the derivative at ``α = 1`` in direction ``e_j`` is the first-order response
  ``δ = θ − θ̃`` of DICE-E (DESIGN §2.3): the tangent starts as ``W^t[:, j] v_j`` and is
  propagated by the JVP of the true step (for SGD, ``W (δ − η H δ)``).

A re-run is the recorded run's own :class:`~dicejax.simulator.Simulator`: one
``sim.step`` with the gates at step ``t``, then :func:`dicejax.run` over the later steps
with the run's own gates. So the exact counterfactual (a 0/1 gate, ``vmap``-ed over
sources), forward-mode cascades (``jax.linearize`` in ``α``, ``vmap``-ed over tangents
``e_j``) and adjoint cascades (one ``jax.vjp`` in ``α``) all replay exactly what ran.

What influence reads off a node is its *probe variables*: the parameters and, for stateful
models, the model state (both enter the probe loss ``L(θ, s; z')``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.mixing import Mixer
from dicejax.pytrees import shape_key, shape_structs
from dicejax.robust import RobustMixer
from dicejax.simulator import Gate, LossFn, NodeState, Simulator, run
from dicejax.trajectory import Trajectory

PyTree = Any

# Influence re-runs carry a batch of sources (vmap), and XLA:CPU's batched row gathers make
# the sparse kernel 4-5x slower there than one dense product (dice_e r = 3, digits MLP,
# exponential graph: n = 16 0.12 s dense vs 0.44 s sparse; n = 64 2.1 s vs 11.2 s), so
# re-runs of graphs up to this many nodes gossip through the dense matrices.
DENSE_RERUN_MAX_NODES = 256

# re-runs of at most this many later steps are unrolled (no XLA while loop)
MAX_UNROLLED_HOPS = 8


def rerun_simulator(loss_fn: LossFn, traj: Trajectory) -> Simulator:
    """The simulator of influence re-runs: the run's, with ``loss_fn``, no per-step
    consensus or finiteness flags, and the dense form of its mixer up to
    :data:`DENSE_RERUN_MAX_NODES`."""
    sim = traj.simulator
    m = sim.mixer
    if isinstance(m, Mixer) and m.indices is not None \
            and m.matrices.shape[-1] <= DENSE_RERUN_MAX_NODES:
        m = Mixer(m.matrices)
    return sim.replace(mixer=m, loss_fn=loss_fn, consensus=False, finite=False)


def float_dtype(traj: Trajectory):
    """The dtype of the trajectory's (first) float parameter leaf."""
    leaves = [x for x in jax.tree.leaves(traj.params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return leaves[0].dtype


def tree_at(tree: PyTree, t) -> PyTree:
    """Index ``t`` of every leaf's leading axis (``t`` may be traced)."""
    return jax.tree.map(lambda x: x[t], tree)


def batches_at(traj: Trajectory, t, hops: int) -> PyTree:
    """Recorded batches of local steps ``t .. t+hops-1``, leaves ``[hops, n, B, ...]``."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, t, hops, 0), traj.batches)


def gates_at(traj: Trajectory, t, length: int) -> Gate | None:
    """The run's own gates of local steps ``t .. t+length-1`` (``[length, n]``), or None."""
    if traj.gates is None:
        return None
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, t, length, 0), traj.gates)


def step_gate(traj: Trajectory, t, alpha: jax.Array | None) -> Gate | None:
    """The gate of local step ``t`` with the source gates ``alpha`` ``[n]`` on top of the
    run's own (``update = σ_t α``, ``state = [σ_t ≠ 0] α``); None for the recorded step."""
    own = None if traj.gates is None else tree_at(traj.gates, t)
    if alpha is None:
        return own
    if own is None:
        return Gate(alpha, alpha)
    return Gate(own.update * alpha, own.state * alpha)


def probe_vars(states: NodeState) -> tuple[PyTree, PyTree]:
    """What the probe loss reads of (stacked) states: ``(params, model_state)``."""
    return states.params, states.model_state


def rerun(loss_fn: LossFn, traj: Trajectory, t, hops: int, alpha: jax.Array | None, *,
          every_step: bool = True) -> NodeState:
    """Re-runs ``hops`` steps from recorded step ``t`` with node gates ``alpha`` at step ``t``.

    Args:
      loss_fn: one node's training loss.
      traj: a recorded trajectory.
      t: local step index (may be traced).
      hops: ``r >= 1`` (static).
      alpha: ``[n]`` gates of the local updates at step ``t`` (later steps keep the run's
        own gates); None re-runs the recorded steps.
      every_step: return the states after each of the ``r`` steps (leaves ``[r, n, ...]``);
        ``False``: only the state after the last one (leaves ``[n, ...]``).

    Returns:
      A :class:`~dicejax.simulator.NodeState` (stacked over the ``r`` steps, or the last).
    """
    sim = rerun_simulator(loss_fn, traj)
    batches = batches_at(traj, t, hops)
    state, _ = sim.step(traj.state_at(t), tree_at(batches, 0), step_gate(traj, t, alpha))
    if hops == 1:
        return jax.tree.map(lambda x: x[None], state) if every_step else state
    rest = jax.tree.map(lambda x: x[1:], batches)
    # fully unrolled for short cascades: XLA:CPU runs convolutions inside a while loop
    # ~5x slower than outside one (benchmarks/RESULTS.md §2, finding 4)
    last, outs = run(sim, state, rest, gates_at(traj, t + 1, hops - 1), record=every_step,
                     unroll=hops - 1 <= MAX_UNROLLED_HOPS)
    if not every_step:
        return last
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), state, outs.state)


def probe_losses(sim: Simulator, variables: tuple[PyTree, PyTree], probe: PyTree,
                 lead: int = 1) -> jax.Array:
    """Probe loss ``L(θ, s; z')`` of every stacked node.

    Args:
      sim: the simulator (its loss form).
      variables: ``(params, model_state)`` with ``lead`` leading stacking axes (e.g.
        ``[n, ...]`` or ``[r, n, ...]``); ``model_state`` may be None.
      probe: the probe batch ``z'``, shared by all nodes.
      lead: number of leading stacking axes.

    Returns:
      Losses with the ``lead`` leading axes (``[n]`` or ``[r, n]``).
    """
    fn = lambda v: sim.probe_loss(v[0], v[1], probe)  # noqa: E731
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(variables)


def probe_grads(sim: Simulator, variables: tuple[PyTree, PyTree], probe: PyTree,
                lead: int = 1) -> tuple[PyTree, PyTree]:
    """Gradients of every stacked node's probe loss w.r.t. ``(params, model_state)``."""
    fn = jax.grad(lambda v: sim.probe_loss(v[0], v[1], probe))
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(variables)


def tree_dot(a: PyTree, b: PyTree, lead: int = 1) -> jax.Array:
    """Per-node inner products of two stacked pytrees with ``lead`` leading axes (float
    leaves only: integer leaves have no tangent)."""
    total = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(jnp.result_type(y), jnp.inexact) and y.dtype != jax.dtypes.float0:
            total = total + jnp.sum((x * y).reshape((*x.shape[:lead], -1)), axis=-1)
    return total


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


def check_step(value: Any, name: str, num_steps: int, *, stop: bool = False) -> int:
    """Validates a local step index: ``0 <= value < T`` (``stop``: ``0 < value <= T``)."""
    lo, hi = (1, num_steps) if stop else (0, num_steps - 1)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) \
            or not lo <= value <= hi:
        raise ValueError(f"{name}: must be a local step index in [{lo}, {hi}] (0 = the "
                         f"trajectory's first step), got {value!r}")
    return int(value)


@functools.cache
def _probe_loss_fn(loss_fn, has_aux, stateful, rng):
    """``(variables, probe) -> L`` for one node, one function per loss and form (so that
    repeated checks share one trace)."""
    shell = Simulator(None, loss_fn, has_aux=has_aux, stateful=stateful, rng=rng)
    return lambda v, probe: shell.probe_loss(v[0], v[1], probe)


@functools.lru_cache(maxsize=64)
def _probe_shape_cached(loss_fn, has_aux, stateful, rng, one_key, probe_key):
    return _probe_shape(loss_fn, has_aux, stateful, rng, shape_structs(one_key),
                        shape_structs(probe_key))


def _probe_shape(loss_fn, has_aux, stateful, rng, one, probe):
    """The probe loss' output shape struct, or the message of the error evaluating it
    raised (shapes only, so :func:`_probe_shape_cached` keys it on the shapes)."""
    try:
        return jax.eval_shape(_probe_loss_fn(loss_fn, has_aux, stateful, rng), one, probe)
    except Exception as e:  # the message becomes the ValueError's
        return str(e) or type(e).__name__


def check_query(
    traj: Trajectory, probe: PyTree, step: int, hops: int, node_weights, loss_fn: LossFn, *,
    reruns: bool = False,
) -> jax.Array:
    """Validates an influence query; returns the node weights ``q`` ``[n]``.

    ``step`` is a *local* index (``0 <= step < T``, the position in the trajectory) and
    ``step + hops <= T``. ``reruns``: the query only re-runs recorded steps, so it stays
    exact under a robust combine rule (:mod:`dicejax.robust`); other queries linearise the
    gossip through ``W`` and refuse such runs. Non-finite parameters are refused except in
    isolating runs (``on_divergence="isolate"``), where a diverged node's scores are NaN.
    """
    if not isinstance(traj, Trajectory):
        raise ValueError(f"traj: must be a Trajectory from dicejax.simulate, got {type(traj)}")
    if not traj.recorded:
        raise ValueError("traj: was run with record=False; influence needs record=True")
    if not reruns and isinstance(traj.mixer, RobustMixer):
        raise ValueError(
            f"traj: ran with robust gossip ({traj.mixer.aggregator.rule}), which is not "
            "linear in W; this estimator linearises the gossip through W. Re-run forms stay "
            "exact: dice_gt, apps.contribution.leave_one_out / shapley")
    T, n = traj.num_steps, traj.num_nodes
    check_step(step, "step", T)
    if isinstance(hops, bool) or not isinstance(hops, int | np.integer) or hops < 1:
        raise ValueError(f"hops: must be a positive integer, got {hops!r}")
    if step + hops > T:
        raise ValueError(
            f"hops: step + hops = {step + hops} exceeds the trajectory's T = {T} steps"
        )
    if not traj.simulator.isolate and not bool(_finite_window(traj.params, step, hops + 1)):
        raise ValueError(f"traj: non-finite parameters between steps {step} and {step + hops}")
    sim = traj.simulator
    one = probe_vars(traj.node_struct())
    try:  # cached per loss and shapes: a repeated query does not trace the loss again
        out = _probe_shape_cached(loss_fn, sim.has_aux, sim.stateful, sim.rng, shape_key(one),
                                  shape_key(probe))
    except TypeError:  # a leaf without shape and dtype, or an unhashable loss
        out = _probe_shape(loss_fn, sim.has_aux, sim.stateful, sim.rng, one, probe)
    if isinstance(out, str):
        raise ValueError(f"probe: loss_fn(params, probe) failed for this probe: {out}")
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"probe: loss_fn(params, probe) must be a scalar, got shape "
            f"{getattr(out, 'shape', None)}"
        )
    probe_leaves = jax.tree.leaves(probe)
    if any(jnp.size(x) == 0 for x in probe_leaves):
        raise ValueError("probe: is empty; give at least one example")
    if not all(np.isfinite(np.asarray(x)).all() for x in probe_leaves
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
