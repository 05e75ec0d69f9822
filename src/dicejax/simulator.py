"""Decentralized SGD, adapt-then-combine (ATC), as a pair of pure functions.

In the style of jax-md's ``init_fn, step_fn = simulate.nve(...)`` and optax's factories, a
:class:`Simulator` closes over the configuration (one node's loss, the optax optimizer every
node runs locally, the gossip operator) and offers two pure functions::

    sim = dj.atc(loss_fn, optax.sgd(0.1), dj.mixing.from_topology(topo))
    state = sim.init(params)                       # a NodeState, leaves [n, ...]
    state, out = sim.step(state, batch)            # one ATC step of every node
    state, outs = dj.run(sim, state, batches)      # T steps: one jittable lax.scan

One step (DESIGN §2.1), every node at once (``vmap`` over the node axis):

1. local update: ``θ_k^{t+½}, s_k^{t+1} = O(θ_k^t, s_k^t, ∇L(θ_k^t; z_k^t))`` — any optax
   optimizer, whose state ``s_k`` stays local to the node; optionally gated (a
   :class:`Gate`: 1 = ordinary training, 0 = the update is dropped);
2. gossip: ``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}``.

What a user bringing their own model needs is part of the state and of the loss' form:

* ``has_aux=True``: the loss returns ``(loss, aux)``; ``aux`` (per node) is an output of
  every step (``StepOutput.aux``).
* ``stateful=True``: non-trainable model state (e.g. BatchNorm statistics) in
  ``NodeState.model_state``, leaves ``[n, ...]``, local to each node by default
  (``gossip_model_state=True`` mixes it like the parameters). The loss is
  ``loss_fn(params, model_state, batch) -> (loss, new_model_state)`` (with ``has_aux``:
  ``(loss, (new_model_state, aux))``).
* ``rng=True``: the loss takes a trailing PRNG key, ``loss_fn(params, batch, key)`` (dropout).
  Node ``k``'s key at global step ``t`` is ``fold_in(fold_in(state.key, t), k)``: a
  deterministic function of the base key and the step, so influence re-runs see the same
  keys as the run. Probe and evaluation losses get ``key=None`` (deterministic mode).

Every step index here is *global* (``state.step``: ``W^t`` is ``mixer`` at ``t``); a
:class:`~dicejax.trajectory.Trajectory` maps its local indices ``0..T-1`` onto them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import mixing, pytrees, robust

PyTree = Any
LossFn = Callable[..., Any]

DEFAULT_OPTIMIZER = optax.sgd(0.1)
HIGHEST = jax.lax.Precision.HIGHEST


class NodeState(NamedTuple):
    """State of every node.

    Attributes:
      params: pytree, leaves ``[n, ...]``: ``θ^t``.
      opt_state: optimizer state, leaves ``[n, ...]`` (node-local).
      step: scalar int32, the global step index ``t`` of the next step.
      model_state: non-trainable model state (e.g. BatchNorm statistics), leaves ``[n, ...]``,
        or None.
      key: the run's base PRNG key (``rng=True`` simulators), or None.
    """

    params: PyTree
    opt_state: PyTree
    step: jax.Array
    model_state: PyTree = None
    key: jax.Array | None = None


class Gate(NamedTuple):
    """Per-node gates of one step's local updates (see :func:`gate`).

    Attributes:
      update: ``[n]`` gates of the parameter updates ``θ^{t+½} − θ^t``.
      state: ``[n]`` gates of the optimizer-state (and model-state) updates.
    """

    update: jax.Array
    state: jax.Array


def as_gate(gate: Gate | jax.Array | None) -> Gate | None:
    """A :class:`Gate` from ``None``, a ``Gate`` or an array of update gates.

    An array ``s`` gates the parameter updates by ``s`` and the state updates by
    ``[s != 0]``: a scaled or sign-flipped sender still trains normally, a node whose update
    is dropped keeps its optimizer and model state.
    """
    if gate is None or isinstance(gate, Gate):
        return gate
    return Gate(gate, (gate != 0).astype(gate.dtype))


class StepOutput(NamedTuple):
    """What one :meth:`Simulator.step` reports (stacked to ``[T, ...]`` by :func:`run`).

    Attributes:
      loss: ``[n]`` train loss ``L(θ_k^t; z_k^t)`` before the step.
      finite: ``[n]`` bool, whether every parameter of ``θ_k^{t+½}`` is finite (checked
        before gossip, which would spread one node's NaN to every receiver); None when the
        simulator was built with ``finite=False``.
      consensus: scalar, :func:`consensus_distance` of ``θ^{t+1}`` (None when the simulator
        was built with ``consensus=False``).
      aux: the loss' auxiliary output, leaves ``[n, ...]`` (``has_aux``; else None).
      half_params: ``θ^{t+½}``, leaves ``[n, ...]`` (``record=True``; else None).
      half_model_state: the model state after the local update, before any gossip
        (``record=True`` with model state; else None).
      state: the :class:`NodeState` after the step (``record=True``; else None).
      eval: :func:`run`'s periodic evaluation of ``θ^{t+1}`` (NaN on other steps), or None.
    """

    loss: jax.Array
    finite: jax.Array
    consensus: jax.Array | None = None
    aux: PyTree = None
    half_params: PyTree = None
    half_model_state: PyTree = None
    state: NodeState | None = None
    eval: PyTree = None


def consensus_distance(params: PyTree, num_nodes: int | None = None) -> jax.Array:
    """Mean over nodes of ``||θ_k − θ̄||²`` (summed over all leaves); a scalar.

    The node average is a ``[1, n] × [n, P]`` product and the squared norms are row sums:
    XLA:CPU runs the column reduction of ``jnp.mean(x, axis=0)`` over a ``[16, 100352]``
    leaf at 10–16 ms, the product in about 1 ms (benchmarks/RESULTS.md §2, finding 1).

    Args:
      params: pytree, leaves ``[n, ...]``.
      num_nodes: count only the first ``num_nodes`` nodes (the rest is padding, whatever its
        values); default all.
    """
    n = jax.tree.leaves(params)[0].shape[0]
    m = n if num_nodes is None else num_nodes
    # [1, n] averaging weights: 1/m over the real nodes, 0 over padded ones
    avg = np.where(np.arange(n) < m, 1.0 / m, 0.0)[None]
    real = None if m == n else jnp.asarray(np.arange(n) < m)[:, None]

    def sq(x):
        flat = x.reshape(n, -1)
        if real is not None:
            flat = jnp.where(real, flat, jnp.zeros((), flat.dtype))
        mean = jnp.matmul(jnp.asarray(avg, flat.dtype), flat, precision=HIGHEST)  # [1, P]
        d = flat - mean
        if real is not None:
            d = jnp.where(real, d, jnp.zeros((), d.dtype))
        return jnp.sum(jnp.einsum("kp,kp->k", d, d, precision=HIGHEST))

    return sum(sq(x) for x in jax.tree.leaves(params)) / m


def node_finite(params: PyTree) -> jax.Array:
    """``[n]`` bool: every float parameter of node ``k`` is finite.

    A float row sum of ``x · 0`` is NaN exactly where some entry of the row is NaN or ±inf;
    XLA:CPU runs it about twice as fast as a boolean ``all(isfinite(x), axis=1)``
    (benchmarks/RESULTS.md §2, finding 2).
    """
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    n = leaves[0].shape[0]
    flags = [jnp.isfinite(jnp.sum(x.reshape(n, -1) * jnp.zeros((), x.dtype), axis=1))
             for x in leaves]
    return functools.reduce(jnp.logical_and, flags)


def has_float_leaves(tree: PyTree) -> bool:
    """Whether ``tree`` has an inexact (float or complex) leaf."""
    return any(jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(tree))


def gate(old: PyTree, new: PyTree, scale: jax.Array) -> PyTree:
    """Scales each node's change from ``old`` to ``new`` by its gate ``scale``.

    ``new + (s − 1)(new − old)`` for float leaves — exactly ``new`` at ``s = 1`` and exactly
    ``old`` at ``s = 0`` (a dropped update) — and ``where(s = 0, old, new)`` for integer leaves
    (e.g. Adam's step count). ``s = −1`` flips the update, ``s = 0`` makes a free-rider that
    forwards what it received without training.

    Args:
      old: pytree, leaves ``[n, ...]`` (before the local update).
      new: pytree, leaves ``[n, ...]`` (after it).
      scale: ``[n]`` gates.

    Returns:
      The gated pytree.
    """

    def one(o, w):
        a = scale.reshape((-1,) + (1,) * (jnp.ndim(w) - 1))
        if not jnp.issubdtype(jnp.result_type(w), jnp.inexact):
            return jnp.where(a == 0, o, w)
        return jnp.where(a == 0, o, w + (a - 1).astype(w.dtype) * (w - o))

    return jax.tree.map(one, old, new)


_apply_gate = gate  # Simulator.step's argument ``gate`` shadows the function


@functools.lru_cache(maxsize=64)
def vmapped_init(init_fn: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
    """``jit(vmap(init_fn))``, one per optimizer: every node's optimizer state in one
    dispatch (an eager ``vmap`` re-traces the optimizer's ``init`` on every call)."""
    return jax.jit(jax.vmap(init_fn))


def replicate(params: PyTree, n: int) -> PyTree:
    """Stacks ``n`` copies of a single-node pytree: every leaf gets a leading axis ``n``.

    Args:
      params: pytree of arrays for one node.
      n: number of nodes (``>= 1``).

    Returns:
      Pytree with leaves ``[n, ...]``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))) + 0, params)


@pytrees.dataclass
class Simulator:
    """ATC decentralized learning as ``init`` / ``step`` (made by :func:`atc`).

    A pytree: the gossip operator is its only array field, so a simulator enters ``jit``
    and ``grad`` as an argument (gradients with respect to ``W`` flow through ``mixer``);
    everything else is static configuration.

    Attributes:
      mixer: the gossip operator, :class:`dicejax.mixing.Mixer` (or a sharded one from
        :func:`dicejax.parallel.shard_mixer`); step ``t`` uses ``W^t``.
      loss_fn: one node's loss (its form is set by ``has_aux``, ``stateful``, ``rng``).
      optimizer: the optax transformation every node runs on its own gradient.
      has_aux: the loss returns ``(loss, aux)``.
      stateful: nodes carry non-trainable model state (see the module docstring).
      rng: the loss takes a trailing PRNG key.
      gossip_model_state: mix the model state like the parameters (default: local).
      consensus: report the consensus distance after every step.
      num_nodes: the number of real nodes when the node axis is padded (sharded runs);
        None = all.
      finite: report per node whether its local update is finite, every step (one pass
        over the parameters; :func:`dicejax.simulate` checks chunk ends instead and replays
        a chunk with this on only when it diverged).
      isolate: gossip through :func:`dicejax.mixing.isolate`: a node whose local update is
        non-finite sends nothing through zero weights, so only the nodes that listen to it
        diverge with it (implies the per-step finiteness flags).
    """

    mixer: Any
    loss_fn: LossFn = pytrees.static_field()
    optimizer: optax.GradientTransformation = pytrees.static_field(default=DEFAULT_OPTIMIZER)
    has_aux: bool = pytrees.static_field(default=False)
    stateful: bool = pytrees.static_field(default=False)
    rng: bool = pytrees.static_field(default=False)
    gossip_model_state: bool = pytrees.static_field(default=False)
    consensus: bool = pytrees.static_field(default=True)
    num_nodes: int | None = pytrees.static_field(default=None)
    finite: bool = pytrees.static_field(default=True)
    isolate: bool = pytrees.static_field(default=False)

    # ----------------------------------------------------------------------------------------
    # the loss, whatever its form
    # ----------------------------------------------------------------------------------------

    def loss_parts(self, params: PyTree, model_state: PyTree, batch: PyTree,
                   key: jax.Array | None) -> tuple[jax.Array, PyTree, PyTree]:
        """Calls one node's loss in its form; returns ``(loss, new_model_state, aux)``.

        Args:
          params: one node's parameters (no node axis).
          model_state: its model state (None without one).
          batch: its batch, leaves ``[B, ...]``.
          key: its PRNG key (``rng``), or None for a deterministic evaluation.
        """
        args = (params, model_state, batch) if self.stateful else (params, batch)
        out = self.loss_fn(*args, key) if self.rng else self.loss_fn(*args)
        if self.stateful:
            loss, rest = out
            new_state, aux = rest if self.has_aux else (rest, None)
        else:
            loss, aux = out if self.has_aux else (out, None)
            new_state = model_state
        return loss, new_state, aux

    def probe_loss(self, params: PyTree, model_state: PyTree, batch: PyTree) -> jax.Array:
        """One node's evaluation loss ``L(θ; z)`` (a scalar; ``key=None``, aux dropped)."""
        return self.loss_parts(params, model_state, batch, None)[0]

    def keys_for(self, key: jax.Array | None, step, nodes: jax.Array) -> jax.Array | None:
        """PRNG keys of ``nodes`` ``[m]`` at global step ``step``:
        ``fold_in(fold_in(key, step), k)`` (None without ``rng``)."""
        if not self.rng:
            return None
        base = jax.random.fold_in(key, step)
        return jax.vmap(lambda k: jax.random.fold_in(base, k))(nodes)

    def node_keys(self, state: NodeState) -> jax.Array | None:
        """``[n]`` PRNG keys of every node at the step ``state.step``."""
        n = jax.tree.leaves(state.params)[0].shape[0]
        return self.keys_for(state.key, state.step, jnp.arange(n))

    # ----------------------------------------------------------------------------------------
    # init / step
    # ----------------------------------------------------------------------------------------

    def init(self, params: PyTree, model_state: PyTree = None, key: jax.Array | None = None,
             step: int | jax.Array = 0) -> NodeState:
        """Initial state of every node: ``θ^0`` and the node-local optimizer states.

        Args:
          params: pytree, leaves ``[n, ...]``.
          model_state: leaves ``[n, ...]`` (required by ``stateful`` simulators).
          key: the base PRNG key (required by ``rng`` simulators): a ``uint32[2]`` raw key
            or a typed key.
          step: global step index of the first step.

        Returns:
          A :class:`NodeState`.
        """
        if self.stateful and model_state is None:
            raise ValueError("model_state: required by a stateful simulator (stateful=True)")
        if not self.stateful and model_state is not None:
            raise ValueError("model_state: given, but the simulator was built with "
                             "stateful=False")
        if self.rng and key is None:
            raise ValueError("key: required by a simulator whose loss takes a PRNG key "
                             "(rng=True)")
        if not self.rng and key is not None:
            raise ValueError("key: given, but the simulator was built with rng=False")
        return NodeState(params, vmapped_init(self.optimizer.init)(params),
                         jnp.asarray(step, jnp.int32), model_state,
                         None if key is None else jnp.asarray(key))

    def local_update(self, params: PyTree, opt_state: PyTree, model_state: PyTree,
                     batch: PyTree, key: jax.Array | None):
        """One node's adapt step: ``θ^{t+½} = θ^t + O(∇L(θ^t; z))``.

        Returns:
          ``(half_params, new_opt_state, new_model_state, loss, aux)`` with
          ``loss = L(θ^t; z)``.
        """

        def objective(p):
            loss, new_state, aux = self.loss_parts(p, model_state, batch, key)
            return loss, (new_state, aux)

        (loss, (new_state, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        if self.stateful:  # keep the state's dtypes, as optax keeps the parameters'
            new_state = jax.tree.map(lambda new, old: jnp.asarray(new, jnp.result_type(old)),
                                     new_state, model_state)
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state, new_state, loss, aux

    def step(self, state: NodeState, batch: PyTree, gate: Gate | jax.Array | None = None, *,
             record: bool = False) -> tuple[NodeState, StepOutput]:
        """One ATC step of every node.

        Args:
          state: :class:`NodeState` at ``t`` (step ``t = state.step`` uses ``W^t``).
          batch: leaves ``[n, B, ...]``.
          gate: optional gates of the local updates: ``[n]`` (see :func:`as_gate`) or a
            :class:`Gate`.
          record: also return ``θ^{t+½}`` and the new state in the output (what a
            :class:`~dicejax.trajectory.Trajectory` is built from).

        Returns:
          ``(state at t+1, StepOutput)``.
        """
        keys = self.node_keys(state)
        half, opt_state, model_state, loss, aux = jax.vmap(self.local_update)(
            state.params, state.opt_state, state.model_state, batch, keys)
        g = as_gate(gate)
        if g is not None:
            half = _apply_gate(state.params, half, g.update)
            opt_state = _apply_gate(state.opt_state, opt_state, g.state)
            if self.stateful:
                model_state = _apply_gate(state.model_state, model_state, g.state)
        finite = node_finite(half) if self.finite or self.isolate else None
        if self.isolate:
            params = self.mixer.apply(state.step, half, finite)
        else:
            params = self.mixer.apply(state.step, half)
        mixed_state = model_state
        if self.stateful and self.gossip_model_state:
            if self.isolate and has_float_leaves(model_state):
                mixed_state = self.mixer.apply(state.step, model_state, node_finite(model_state))
            else:
                mixed_state = self.mixer.apply(state.step, model_state)
        new = NodeState(params, opt_state, state.step + 1, mixed_state, state.key)
        out = StepOutput(
            loss, finite,
            consensus_distance(params, self.num_nodes) if self.consensus else None,
            aux,
            half if record else None,
            model_state if record and self.stateful else None,
            new if record else None,
        )
        return new, out


def atc(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    mixer: Any = None,
    *,
    has_aux: bool = False,
    stateful: bool = False,
    rng: bool = False,
    gossip_model_state: bool = False,
    consensus: bool = True,
    finite: bool = True,
    isolate: bool = False,
) -> Simulator:
    """Adapt-then-combine decentralized learning: the :class:`Simulator` factory.

    Args:
      loss_fn: one node's loss. Default form ``loss_fn(params, batch) -> scalar``;
        ``stateful``: ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``;
        ``has_aux`` wraps the rest with an ``aux`` (``(loss, aux)`` or
        ``(loss, (new_model_state, aux))``); ``rng`` appends a ``key`` argument (None in
        probe and evaluation calls).
      optimizer: any optax transformation; its state is local to each node.
      mixer: the gossip operator: a :class:`dicejax.mixing.Mixer` (or sharded mixer), or
        anything :func:`dicejax.mixing.from_topology` accepts (a Topology, an ``[n, n]`` or
        ``[T, n, n]`` matrix).
      has_aux, stateful, rng, gossip_model_state: see the module docstring.
      consensus: report the consensus distance after every step (one ``[1, n] × [n, P]``
        product per step).
      finite: report per node whether its local update is finite after every step
        (``StepOutput.finite``; one pass over the parameters per step).
      isolate: a diverged node's non-finite values never travel through zero weights
        (:func:`dicejax.mixing.isolate`); needs a :class:`~dicejax.mixing.Mixer` (or a
        :class:`~dicejax.robust.RobustMixer`, which does not hear non-finite nodes).

    Returns:
      A :class:`Simulator`.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: must be callable, got {type(loss_fn).__name__}")
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer: must be an optax GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    if mixer is None:
        raise ValueError("mixer: required (a Mixer, a Topology or a mixing matrix)")
    if not callable(getattr(mixer, "apply", None)):
        mixer = mixing.from_topology(mixer)
    for name, value in (("has_aux", has_aux), ("stateful", stateful), ("rng", rng),
                        ("gossip_model_state", gossip_model_state), ("consensus", consensus),
                        ("finite", finite), ("isolate", isolate)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be a bool, got {value!r}")
    if gossip_model_state and not stateful:
        raise ValueError("gossip_model_state: needs a stateful simulator (stateful=True)")
    if isolate and not isinstance(mixer, mixing.Mixer | robust.RobustMixer):
        raise ValueError(f"isolate: needs a dicejax.mixing.Mixer (single-device gossip), got "
                         f"{type(mixer).__name__}")
    return Simulator(mixer, loss_fn, optimizer, has_aux, stateful, rng, gossip_model_state,
                     consensus, finite=finite, isolate=isolate)


@pytrees.dataclass
class Evaluation:
    """Periodic evaluation inside :func:`run`: ``fn`` of every node every ``every`` steps.

    Attributes:
      batch: the evaluation batch shared by all nodes, leaves ``[M, ...]``.
      fn: one node's evaluation, ``fn(params, batch) -> dict of scalars`` (stateful
        simulators: ``fn(params, model_state, batch)``), static.
      every: evaluate ``θ^{t+1}`` when ``t + 1`` is a multiple of ``every`` (static).
    """

    batch: PyTree
    fn: Callable = pytrees.static_field()
    every: int = pytrees.static_field(default=1)

    def at(self, sim: Simulator, state: NodeState) -> PyTree:
        """The evaluation of ``state`` on evaluation steps, NaN of its shape elsewhere."""
        fn = self.fn
        if sim.stateful:
            args = (state.params, state.model_state)
            shapes = jax.eval_shape(jax.vmap(fn, in_axes=(0, 0, None)), *args, self.batch)
            evaluate = lambda a: evaluate_nodes(fn, a, self.batch, stateful=True)  # noqa: E731
        else:
            args = state.params
            shapes = jax.eval_shape(jax.vmap(fn, in_axes=(0, None)), args, self.batch)
            evaluate = lambda a: evaluate_nodes(fn, a, self.batch)  # noqa: E731
        return jax.lax.cond(
            state.step % self.every == 0,
            evaluate,
            lambda a: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes),
            args,
        )


@functools.partial(jax.jit, static_argnames=("record", "unroll", "remat"))
def run(
    sim: Simulator,
    state: NodeState,
    batches: PyTree,
    gates: Gate | jax.Array | None = None,
    *,
    record: bool = False,
    unroll: int | bool = 1,
    remat: bool = False,
    evaluation: Evaluation | None = None,
) -> tuple[NodeState, StepOutput]:
    """``T`` steps of ``sim`` from ``state``: one ``lax.scan`` of :meth:`Simulator.step`.

    Jitted; no validation and no host work (call it inside your own ``jit``, ``grad`` or
    ``vmap``). :func:`dicejax.simulate` is validation plus chunks of this.

    Args:
      sim: the simulator.
      state: the state at the first step.
      batches: leaves ``[T, n, B, ...]``.
      gates: per-step gates ``[T, n]`` or a :class:`Gate` of ``[T, n]`` arrays, or None.
      record: record ``θ^{t+½}`` and the state after every step (``outs.half_params``,
        ``outs.state``), the inputs of :meth:`Trajectory.from_run`.
      unroll: ``lax.scan``'s ``unroll``; ``True`` unrolls every step (no XLA while loop,
        which XLA:CPU's convolutions need to run fast; compile time grows with ``T``).
      remat: rematerialise each step in reverse mode (``jax.checkpoint`` of the scan body):
        memory ``O(T · state)`` instead of every step's activations.
      evaluation: periodic evaluation (``outs.eval``).

    Returns:
      ``(final state, outputs)``: a :class:`StepOutput` with leaves ``[T, ...]``.
    """

    def body(state, xs):
        batch, g = xs
        new, out = sim.step(state, batch, g, record=record)
        if evaluation is not None:
            out = out._replace(eval=evaluation.at(sim, new))
        return new, out

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, (batches, gates), unroll=unroll)


# Nodes evaluated at once on an evaluation batch of M examples: max(1, EVAL_EXAMPLES // M),
# so that evaluation memory stays bounded (16 CNN nodes on 2,000 test images at once would
# hold gigabytes of activations).
EVAL_EXAMPLES = 16384


def evaluate_nodes(eval_fn: Callable[..., Any], params: PyTree, batch: PyTree, *,
                   stateful: bool = False) -> Any:
    """``eval_fn(θ_k, batch)`` for every node, a bounded number of nodes at a time.

    Args:
      eval_fn: one node's evaluation (any pytree of scalars).
      params: leaves ``[n, ...]``; with ``stateful``, a pair ``(params, model_state)`` and
        ``eval_fn(θ_k, s_k, batch)``.
      batch: evaluation batch shared by all nodes, leaves ``[M, ...]``.

    Returns:
      ``eval_fn``'s output with a leading node axis ``[n]``.
    """
    m = jax.tree.leaves(batch)[0].shape[0]
    n = jax.tree.leaves(params)[0].shape[0]
    per = max(1, EVAL_EXAMPLES // max(m, 1))
    fn = (lambda a: eval_fn(*a, batch)) if stateful else (lambda p: eval_fn(p, batch))
    if per >= n:
        return jax.vmap(fn)(params)
    return jax.lax.map(fn, params, batch_size=per)


__all__ = [
    "DEFAULT_OPTIMIZER",
    "Evaluation",
    "Gate",
    "NodeState",
    "Simulator",
    "StepOutput",
    "as_gate",
    "atc",
    "consensus_distance",
    "evaluate_nodes",
    "gate",
    "has_float_leaves",
    "node_finite",
    "replicate",
    "run",
    "vmapped_init",
]
