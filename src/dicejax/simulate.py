"""``simulate``: a whole validated run of ATC decentralized learning, as a Trajectory.

:func:`simulate` is the one-call entry point: it validates its inputs at the boundary
(clear ``ValueError`` naming the argument), builds the :class:`~dicejax.simulator.Simulator`
(``dj.atc``), runs the steps in chunks of :func:`~dicejax.simulator.run` (one ``lax.scan``
each), checks for divergence after each chunk, and builds the
:class:`~dicejax.trajectory.Trajectory` with :meth:`~dicejax.trajectory.Trajectory.from_run`.
Results are identical to one ``run`` over all steps. Users who want their own loop use
``dj.atc`` / ``sim.step`` / ``dj.run`` directly.

The names of :mod:`dicejax.simulator` and :mod:`dicejax.trajectory` are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import parallel, robust
from dicejax import topology as topo_lib
from dicejax.mixing import Method, from_topology
from dicejax.pytrees import concat
from dicejax.simulator import (
    DEFAULT_OPTIMIZER,
    Evaluation,
    Gate,
    LossFn,
    NodeState,
    Simulator,
    StepOutput,
    as_gate,
    atc,
    consensus_distance,
    evaluate_nodes,
    gate,
    node_finite,
    replicate,
    run,
    vmapped_init,
)
from dicejax.trajectory import Trajectory, final_state

PyTree = Any


def init(params: PyTree, optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
         step: int = 0) -> NodeState:
    """Initial state of every node for a stateless loss (``sim.init`` in general).

    Args:
      params: pytree, leaves ``[n, ...]``.
      optimizer: optax transformation applied by every node.
      step: global step index of the first step.

    Returns:
      A :class:`~dicejax.simulator.NodeState`.
    """
    return NodeState(params, vmapped_init(optimizer.init)(params), jnp.asarray(step, jnp.int32))


# --------------------------------------------------------------------------------------------
# Validation at the boundary
# --------------------------------------------------------------------------------------------


def is_tracer(x) -> bool:
    """Whether ``x`` is a JAX tracer (inside ``jit``/``grad``: no concrete value to check)."""
    return isinstance(x, jax.core.Tracer)


def check_params(params: PyTree, name: str = "params") -> int:
    """Validates stacked parameters (float leaves ``[n, ...]``, finite); returns ``n``."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name}: must be a pytree with at least one array leaf")
    shapes = [jnp.shape(x) for x in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(f"{name}: every leaf needs a leading node axis n; found a scalar leaf")
    ns = {s[0] for s in shapes}
    if len(ns) != 1:
        raise ValueError(f"{name}: leaves disagree on the leading node axis: {sorted(ns)}")
    for x in leaves:
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name}: leaves must be real floating arrays, got dtype {dtype}")
    concrete = [x for x in leaves if not is_tracer(x) and np.size(x)]
    # on the device: no host copy of the parameters (one scalar comes back)
    if concrete and not bool(all_nodes_finite(concrete)):
        raise ValueError(f"{name}: contains non-finite values (NaN or Inf)")
    return ns.pop()


def check_batches(batches: PyTree, n: int, name: str = "batches") -> int:
    """Validates batches with leaves ``[T, n, B, ...]``; returns ``T``."""
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError(f"{name}: must be a pytree with at least one array leaf")
    heads = {tuple(jnp.shape(x)[:2]) for x in leaves}
    if any(len(h) < 2 for h in heads):
        raise ValueError(f"{name}: every leaf needs leading axes [T, n, ...]")
    if len(heads) != 1:
        raise ValueError(f"{name}: leaves disagree on the leading axes [T, n]: {sorted(heads)}")
    t, m = heads.pop()
    if m != n:
        raise ValueError(f"{name}: leading axes are [T={t}, n={m}] but params have n={n} nodes")
    if t == 0:
        raise ValueError(f"{name}: T = 0 steps; give at least one step of batches")
    return t


def scalar_loss(sim: Simulator) -> Callable[..., jax.Array]:
    """``(params, model_state, batch, key) -> loss`` of the simulator's loss form; one cached
    function per loss and form, so that checks of equal shapes share one trace."""
    return _scalar_loss(sim.loss_fn, sim.has_aux, sim.stateful, sim.rng)


@functools.cache
def _scalar_loss(loss_fn, has_aux, stateful, rng):
    shell = Simulator(None, loss_fn, has_aux=has_aux, stateful=stateful, rng=rng)
    return lambda params, model_state, batch, key: shell.loss_parts(
        params, model_state, batch, key)[0]


def one_node_loss_jaxpr(sim: Simulator, state: NodeState, batches: PyTree):
    """``(jaxpr, output shape)`` of one node's loss at the shapes of ``state`` and
    ``batches``.

    Traced from ``jax.ShapeDtypeStruct`` leaves (a slice of the arrays would cost an eager
    dispatch per leaf) and cached per loss and shapes, so the loss checks and
    :func:`auto_unroll` of a second call with equal shapes trace nothing. A failing trace
    raises again; it is not cached.
    """
    def drop(x, k):
        return jax.ShapeDtypeStruct(jnp.shape(x)[k:], jnp.result_type(x))
    one = jax.tree.map(lambda x: drop(x, 1), (state.params, state.model_state))
    batch = jax.tree.map(lambda x: drop(x, 2), batches)
    key = None if state.key is None else drop(state.key, 0)
    leaves, treedef = jax.tree.flatten((*one, batch, key))
    return _traced(scalar_loss(sim), treedef, tuple(leaves))


@functools.lru_cache(maxsize=256)
def _traced(loss, treedef, shapes: tuple):
    return jax.make_jaxpr(loss, return_shape=True)(*jax.tree.unflatten(treedef, list(shapes)))


def check_loss_output(sim: Simulator, state: NodeState, batches: PyTree) -> None:
    """Checks that the loss returns a real scalar (and its form's extras) for one node."""
    try:
        out = one_node_loss_jaxpr(sim, state, batches)[1]
    except (TypeError, ValueError) as err:
        forms = ("loss_fn(params, model_state, batch" if sim.stateful else "loss_fn(params, batch")
        forms += ", key)" if sim.rng else ")"
        raise ValueError(f"loss_fn: calling {forms} failed (has_aux={sim.has_aux}, "
                         f"stateful={sim.stateful}, rng={sim.rng}): {err}") from err
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn: must return a real scalar loss for one node's batch, got "
                         f"{getattr(out, 'shape', out)} {getattr(out, 'dtype', '')}")


def check_update_scale(scale, n: int) -> jax.Array | None:
    """Validates ``[n]`` or ``[T, n]`` update gates."""
    if scale is None:
        return None
    try:
        arr = scale if is_tracer(scale) else jnp.asarray(scale)
    except TypeError as e:
        raise ValueError(f"update_scale: must be a numeric array, got {type(scale)}") from e
    if not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise ValueError(f"update_scale: must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[-1] != n:
        raise ValueError(f"update_scale: must have shape [n] or [T, n] with n={n}, "
                         f"got {arr.shape}")
    if not is_tracer(arr) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError("update_scale: contains non-finite values")
    return arr


def _check_int(value, name: str, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: must be {'None or ' if allow_none else ''}a {kind} integer, "
                         f"got {value!r}")


@jax.jit
def all_nodes_finite(params: PyTree) -> jax.Array:
    """Scalar bool: every float parameter of every node is finite (one pass, on device).

    A whole-leaf sum of ``x · 0`` is NaN exactly where some entry is NaN or ±inf: 2.2 ms for
    the 1.6 M parameters of 16 MLP nodes on the 2-core CPU, against 3.9 ms for per-node flags
    (:func:`node_finite`) reduced after (``benchmarks/bench_overhead.py``'s case).
    """
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(jnp.sum(x * jnp.zeros((), x.dtype)) for x in leaves))


def raise_if_diverged(loss: jax.Array, finite: jax.Array, offset: int) -> None:
    """Raises FloatingPointError at the first non-finite (step, node) of a chunk.

    Args:
      loss: ``[T_c, n]`` train loss at ``θ^t`` (before step ``t``).
      finite: ``[T_c, n]`` whether each node's local update ``θ^{t+½}`` is finite (checked
        before gossip, which would spread one node's NaN to all through ``0 · NaN``).
      offset: global index of the chunk's first step.
    """
    loss, finite = np.asarray(loss), np.asarray(finite)
    bad_loss, bad_params = ~np.isfinite(loss), ~finite
    if not (bad_loss.any() or bad_params.any()):
        return
    # the loss at t reflects θ^t, i.e. the parameters after step t − 1: order events by that
    t_loss = np.argmax(bad_loss.any(axis=1)) - 0.5 if bad_loss.any() else np.inf
    t_par = np.argmax(bad_params.any(axis=1)) if bad_params.any() else np.inf
    if t_loss <= t_par:
        t = int(t_loss + 0.5)
        k = int(np.flatnonzero(bad_loss[t])[0])
        raise FloatingPointError(
            f"simulate: diverged: the train loss of node {k} is {loss[t, k]} at step "
            f"{offset + t}; lower the learning rate or check the data")
    t = int(t_par)
    nodes = np.flatnonzero(bad_params[t]).tolist()
    raise FloatingPointError(
        f"simulate: diverged: the local update of node {nodes[0]} became non-finite at step "
        f"{offset + t} (nodes {nodes}); lower the learning rate or check the data")


# --------------------------------------------------------------------------------------------
# Unrolling (XLA:CPU's convolutions)
# --------------------------------------------------------------------------------------------

# Steps per fully unrolled scan that unroll=None picks for convolutional models on CPU:
# one scan of the CNN ran 5-7x slower than consecutive unrolled ones (benchmarks/RESULTS.md
# §2, finding 4); compile time grows with the number of unrolled steps.
CONV_UNROLL = 4


def _sub_jaxprs(eqn_params: dict) -> Iterator[Any]:
    """The jaxprs among an equation's parameters (scan/while bodies, cond branches, pjit...)."""
    for value in eqn_params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr wraps a Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def has_primitive(jaxpr, name: str) -> bool:
    """Whether ``jaxpr`` (a Jaxpr or ClosedJaxpr) or any sub-jaxpr uses primitive ``name``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(eqn.primitive.name == name
               or any(has_primitive(sub, name) for sub in _sub_jaxprs(eqn.params))
               for eqn in jaxpr.eqns)


def auto_unroll(sim: Simulator, state: NodeState, batches: PyTree, platform: str) -> int:
    """``unroll=None``: :data:`CONV_UNROLL` on CPU when one node's loss has a convolution,
    else 0 (one ordinary scan)."""
    if platform != "cpu":
        return 0
    jaxpr = one_node_loss_jaxpr(sim, state, batches)[0]
    return CONV_UNROLL if has_primitive(jaxpr, "conv_general_dilated") else 0


def run_chunk(sim: Simulator, state: NodeState, batches: PyTree, gates: Gate | None, *,
              record: bool, unroll: int, evaluation: Evaluation | None = None,
              sync: bool = False) -> tuple[NodeState, StepOutput]:
    """:func:`~dicejax.simulator.run` over one chunk: one scan (``unroll = 0``), or
    consecutive fully unrolled scans of ``unroll`` steps with their outputs concatenated —
    the same computation step for step (XLA may fuse an unrolled step differently from the
    loop body: equal up to an occasional last-bit rounding difference).

    XLA:CPU keeps the weight-gradient convolutions inside a ``while`` loop in a layout that
    falls back to a slow kernel (~10× slower); unrolled, layout assignment gives them the
    fast one (benchmarks/RESULTS.md §2, finding 4). ``sync`` blocks after each piece
    (sharded runs: repeated unblocked collective calls can dead-lock on forced CPU devices,
    DESIGN §5).
    """
    total = jax.tree.leaves(batches)[0].shape[0]
    kw = dict(record=record, evaluation=evaluation)
    if not unroll or unroll >= total:
        return run(sim, state, batches, gates, unroll=bool(unroll) or 1, **kw)
    outs = []
    for s in range(0, total, unroll):
        part = jax.tree.map(lambda x, s=s: x[s : s + unroll], (batches, gates))
        state, ys = run(sim, state, *part, unroll=True, **kw)
        if sync:
            jax.block_until_ready(state)
        outs.append(ys)
    return state, concat(outs)


def _chunks(batches, chunk_steps: int | None) -> Iterator[PyTree]:
    if isinstance(batches, Iterator):
        yield from batches
        return
    if chunk_steps is None:
        yield batches
        return
    total = jax.tree.leaves(batches)[0].shape[0]
    for start in range(0, total, chunk_steps):
        yield jax.tree.map(lambda x, s=start: x[s : s + chunk_steps], batches)


@functools.cache
def loss_evaluation(loss_fn: LossFn, has_aux: bool = False, stateful: bool = False,
                    rng: bool = False) -> Callable[..., dict]:
    """The default evaluation ``{"loss": L(θ; z)}`` of a loss in its form (``key=None``).

    Cached: one function object per loss and form, so evaluation does not recompile.
    """
    shell = Simulator(None, loss_fn, has_aux=has_aux, stateful=stateful, rng=rng)
    if stateful:
        return lambda params, model_state, batch: {
            "loss": shell.probe_loss(params, model_state, batch)}
    return lambda params, batch: {"loss": shell.probe_loss(params, None, batch)}


def _fixed_steps(topo) -> int | None:
    """The exact number of steps a ``[T, n, n]`` array of per-step matrices fixes."""
    if isinstance(topo, topo_lib.Topology) or jnp.ndim(topo) == 2:
        return None
    return int(jnp.shape(topo)[0])


class RunPlan:
    """What :func:`plan_run` validated and built for :func:`simulate` (and checkpointed
    runs): the simulator, the initial state, the device placement and the gates.

    ``plan.step(state, chunk, gates, record)`` runs one chunk (placed on the mesh, in
    unrolled pieces where that is faster), ``plan.trajectory(...)`` assembles the result.
    """

    def __init__(self, sim, state, layout, mixing, fixed_steps, scale, evaluation, unroll):
        self.sim, self.layout, self.fixed, self.scale = sim, layout, fixed_steps, scale
        self.mixing = mixing
        self.n = jax.tree.leaves(state.params)[0].shape[0]
        self.evaluation, self.unroll, self.state0 = evaluation, unroll, state
        self.start = int(state.step)
        # chunks run without per-step finiteness flags: check_divergence looks at the losses
        # and the chunk's last parameters, and replays a chunk with flags only if it diverged
        self.run_sim, self.run_state = sim.replace(finite=False), state
        if layout is not None:
            self.run_sim = self.run_sim.replace(
                mixer=parallel.shard_mixer(sim.mixer, layout, mixing),
                num_nodes=self.n if layout.padded else None)
            self.run_state = layout.place_state(state)
            if evaluation is not None:
                self.evaluation = evaluation.replace(batch=layout.replicate(evaluation.batch))

    def use_mixer(self, mixer: Any) -> None:
        """Runs the next chunks with another gossip operator (e.g. a re-chosen graph)."""
        self.sim = self.sim.replace(mixer=mixer)
        self.run_sim = self.run_sim.replace(
            mixer=mixer if self.layout is None
            else parallel.shard_mixer(mixer, self.layout, self.mixing))

    def gates(self, done: int, t_c: int) -> jax.Array | None:
        if self.fixed is not None and self.start + done + t_c > self.fixed:
            raise ValueError(f"topo: has {self.fixed} per-step matrices but batches run past "
                             f"step {self.fixed}")
        if self.scale is None:
            return None
        if self.scale.ndim == 1:
            return jnp.broadcast_to(self.scale, (t_c, self.n))
        if self.scale.shape[0] < done + t_c:
            raise ValueError(f"update_scale: has {self.scale.shape[0]} steps but batches run "
                             f"past step {self.scale.shape[0]}")
        return self.scale[done : done + t_c]

    def step(self, state, chunk, gates, record, evaluate: bool = True, finite: bool = False):
        """Runs one chunk (``gates`` from :meth:`gates`); ``evaluate=False`` skips the
        periodic evaluation, ``finite=True`` reports per-step finiteness flags. Returns
        ``(state, outputs)``, outputs trimmed to ``n`` nodes."""
        if self.unroll is None:
            platform = (jax.default_backend() if self.layout is None
                        else self.layout.mesh.devices.flat[0].platform)
            self.unroll = auto_unroll(self.sim, self.state0, chunk, platform)
        if self.layout is not None:
            chunk = self.layout.place(chunk, axis=1)
            gates = None if gates is None else self.layout.place(gates, axis=1, fill=1)
        sim = self.run_sim.replace(finite=True) if finite else self.run_sim
        state, ys = run_chunk(sim, state, chunk, as_gate(gates), record=record,
                              unroll=int(self.unroll),
                              evaluation=self.evaluation if evaluate else None,
                              sync=self.layout is not None)
        return state, (ys if self.layout is None else self.layout.trim_outputs(ys))

    def check_divergence(self, before: NodeState, after: NodeState, chunk: PyTree,
                         gates: jax.Array | None, ys: StepOutput, offset: int) -> None:
        """Raises ``FloatingPointError`` at the first non-finite (step, node) of a chunk.

        A chunk runs without per-step finiteness flags: this checks its train losses and
        the parameters after its last step (one host sync of ``[T_c, n]`` losses and ``[n]``
        flags). Only when one is non-finite is the chunk replayed from ``before`` with the
        flags on, so that the error names the step and node where it began, as
        :func:`raise_if_diverged` does.

        Args:
          before: the state the chunk ran from (as placed for :meth:`step`).
          after: the state after it.
          chunk: the chunk's batches; ``gates`` its gates (from :meth:`gates`).
          ys: the chunk's outputs.
          offset: global index of the chunk's first step.
        """
        if is_tracer(ys.loss) or self.sim.isolate:  # isolating runs go on (traj.diverged)
            return
        if ys.finite is None:
            if (bool(np.isfinite(np.asarray(ys.loss)).all())
                    and bool(np.asarray(all_nodes_finite(after.params)))):
                return
            ys = self.step(before, chunk, gates, False, evaluate=False, finite=True)[1]
        raise_if_diverged(ys.loss, ys.finite, offset)
        if not bool(np.asarray(all_nodes_finite(after.params))):  # e.g. overflow in gossip
            raise FloatingPointError(
                f"simulate: diverged: the parameters became non-finite in steps "
                f"{offset}..{offset + len(ys.loss) - 1}; lower the learning rate or check "
                "the data")

    def run_window(self, state: NodeState, batches: PyTree, start: int, stop: int, *,
                   record: bool = False, check_finite: bool = True,
                   ) -> tuple[NodeState, Trajectory]:
        """Runs the steps ``[start, stop)`` of ``batches`` (leaves ``[T, n, B, ...]``, local
        to the plan's first step) from ``state``; checks divergence.

        Returns:
          ``(state after the window, as placed for the next window, its Trajectory)``.
        """
        chunk = jax.tree.map(lambda x: x[start:stop], batches)
        gates = self.gates(start, stop - start)
        new, ys = self.step(state, chunk, gates, record)
        if check_finite:
            self.check_divergence(state, new, chunk, gates, ys, self.start + start)
        traj = self.trajectory(new, [ys], [chunk], [] if gates is None else [gates], record,
                               initial=self.host_state(state))
        return new, traj

    def host_state(self, state):
        return state if self.layout is None else self.layout.trim_state(state)

    def trajectory(self, state, outs, kept, kept_gates, record,
                   initial: NodeState | None = None) -> Trajectory:
        """The :class:`Trajectory` of the chunks ``outs`` run from ``initial`` (default: the
        plan's initial state) to ``state``."""
        initial = self.state0 if initial is None else initial
        ys, state = concat(outs), self.host_state(state)
        start = int(initial.step)
        steps = np.arange(start + 1, start + len(ys.loss) + 1)
        ev = None
        if self.evaluation is not None and ys.eval is not None:
            sel = np.flatnonzero(steps % self.evaluation.every == 0)
            ev = {"step": jnp.asarray(steps[sel]), **jax.tree.map(lambda x: x[sel], ys.eval)}
        return Trajectory.from_run(
            self.sim, initial, ys._replace(eval=None), concat(kept) if record else None,
            concat(kept_gates) if kept_gates else None, final_state=state, eval_metrics=ev)


def simulate(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | Iterable[PyTree],
    topo: topo_lib.Topology | jax.Array | np.ndarray,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    record: bool = True,
    *,
    eval_batch: PyTree | None = None,
    eval_fn: Callable[..., dict] | None = None,
    eval_every: int = 0,
    mixing: Method | parallel.ShardedMethod = "auto",
    chunk_steps: int | None = None,
    initial_state: NodeState | None = None,
    callback: Callable[[NodeState, int], None] | None = None,
    update_scale: jax.Array | np.ndarray | None = None,
    check_finite: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    unroll: int | None = None,
    has_aux: bool = False,
    model_state: PyTree = None,
    key: jax.Array | None = None,
    gossip_model_state: bool = False,
    consensus: bool = False,
    on_divergence: str = "raise",
    aggregator: Any = None,
) -> Trajectory:
    """Simulates ATC decentralized learning for ``T`` steps.

    Args:
      loss_fn: one node's mean loss, ``loss_fn(params, batch) -> scalar`` (other forms:
        ``has_aux``, ``model_state``, ``key`` below; see :func:`dicejax.atc`).
      params: pytree, every leaf ``[n, ...]`` (:func:`replicate` helps): ``θ^0``.
      batches: pytree with every leaf ``[T, n, B, ...]``; or an *iterator* (e.g. a generator)
        of such chunks ``[T_c, n, B, ...]``, run one after the other with results identical
        to one scan over their concatenation.
      topo: a :class:`~dicejax.topology.Topology` (static or periodic), an array ``[n, n]``
        (static) or ``[T, n, n]`` (one matrix per step). Row ``k`` holds the weights node
        ``k`` receives. Gradients with respect to an array flow through the run.
      optimizer: any optax transformation; its state is local to each node.
      record: keep what influence needs: every state, ``θ^{t+½}``, batches and gates.
      eval_batch: a batch pytree ``[M, ...]`` shared by all nodes for periodic evaluation.
      eval_fn: ``eval_fn(params, batch) -> dict of scalars`` for one node (default: the
        loss; with ``model_state``: ``eval_fn(params, model_state, batch)``).
      eval_every: evaluate every this many steps (``θ^t`` for ``t`` a multiple); 0 = never.
      mixing: gossip kernel, ``"auto"`` (by size and density), ``"dense"`` or ``"sparse"``;
        with a ``mesh`` also ``"ppermute"`` or ``"all_gather"`` (see :mod:`dicejax.parallel`).
      chunk_steps: split array ``batches`` into scans of this many steps (same results).
      initial_state: resume from this :class:`NodeState` (``params``, ``model_state`` and
        ``key`` are then taken from it).
      callback: called on the host after each chunk with ``(state, steps_done)``.
      update_scale: ``[n]`` or ``[T, n]`` gates on the local updates (see
        :func:`~dicejax.simulator.gate`): 1 is ordinary training, 0 a free-rider that
        forwards what it receives, −1 a sign-flipped update, ``s`` a scaled one. Recorded in
        the trajectory, so influence re-runs reproduce it.
      check_finite: after each chunk, raise ``FloatingPointError`` naming the first step and
        node whose loss or parameters became non-finite (one host sync per chunk).
      mesh: a ``'nodes'`` device mesh (:func:`dicejax.parallel.node_mesh`): shard the node
        axis of states, optimizer states and batches over its devices (``n`` need not divide
        the device count) with the same results as one device. In a multi-process run every
        process makes the same call with the same host inputs.
      unroll: run each chunk as consecutive fully unrolled scans of this many steps (equal
        up to an occasional last-bit rounding difference); 0 = one ``lax.scan`` per chunk.
        Default ``None``: 4 on the CPU backend when the loss contains a convolution (XLA:CPU
        runs convolution gradients inside a scan's ``while`` loop ~10× slower), else 0.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``traj.metrics["aux"]`` holds the aux
        outputs ``[T, n, ...]``.
      model_state: non-trainable model state ``[n, ...]`` (e.g. BatchNorm statistics):
        ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``.
      key: a base PRNG key: ``loss_fn(..., key)`` gets a per-node, per-step key (dropout).
      gossip_model_state: mix the model state like the parameters (default: node-local).
      consensus: record the consensus distance ``(1/n) Σ_k ||θ_k^{t+1} − θ̄^{t+1}||²``
        after every step as ``traj.metrics["consensus"]`` ``[T]``. Off by default: it
        costs a pass over every parameter per step (the paper's CNN, 16 nodes: 43 → 33
        node-steps/s, benchmarks/RESULTS.md §2, finding 6); :func:`consensus_distance` of
        ``traj.final_params`` (or of any recorded state) gives it where needed.
      on_divergence: ``"raise"`` (default): a non-finite loss or parameter stops the run
        with ``FloatingPointError`` naming the first step and node (``check_finite``).
        ``"isolate"``: the run goes on; a diverged node stays non-finite, its values never
        travel through zero weights (:func:`dicejax.mixing.isolate`), so a node that does
        not listen to it is exactly as if it had stayed finite, and one that does diverges
        with it. ``traj.metrics["finite"]`` ``[T, n]`` holds the per-step flags and
        ``traj.diverged`` ``[n]`` the step each node diverged at (−1: never). One device
        only (no ``mesh``).
      aggregator: the combine step's rule: None (default) or ``"mean"``, plain gossip;
        a :class:`dicejax.robust.Aggregator` (``robust.trimmed_mean(trim)``,
        ``robust.median()``, ``robust.clipped_gossip(tau)``) or its name, Byzantine-robust
        gossip over the graph's support (see :mod:`dicejax.robust`). One device only; DICE's
        estimators refuse such runs (the rules are not linear in ``W``), ``dice_gt`` and
        ``leave_one_out`` re-run the rule.

    Returns:
      A :class:`~dicejax.trajectory.Trajectory`.

    Raises:
      ValueError: for a malformed matrix, mismatched leading axes, non-finite parameters.
      FloatingPointError: when the run diverges (``check_finite``).
    """
    plan = plan_run(loss_fn, params, batches, topo, optimizer, eval_batch=eval_batch,
                    eval_fn=eval_fn, eval_every=eval_every, mixing=mixing,
                    chunk_steps=chunk_steps, initial_state=initial_state,
                    update_scale=update_scale, mesh=mesh, unroll=unroll, has_aux=has_aux,
                    model_state=model_state, key=key, gossip_model_state=gossip_model_state,
                    consensus=consensus, on_divergence=on_divergence, aggregator=aggregator)
    state, outs, kept, kept_gates, done = plan.run_state, [], [], [], 0
    for chunk in _chunks(batches, chunk_steps):
        t_c = check_batches(chunk, plan.n)
        gates = plan.gates(done, t_c)
        before = state
        state, ys = plan.step(state, chunk, gates, record)
        if check_finite:
            plan.check_divergence(before, state, chunk, gates, ys, plan.start + done)
        outs.append(ys)
        if record:
            kept.append(chunk)
        if gates is not None:
            kept_gates.append(gates)
        done += t_c
        if callback is not None:
            callback(plan.host_state(state), done)
    if not outs:
        raise ValueError("batches: the iterator yielded no chunks (T = 0 steps)")
    return plan.trajectory(state, outs, kept, kept_gates, record)


def plan_run(loss_fn: LossFn, params: PyTree, batches: PyTree | Iterable[PyTree], topo: Any,
             optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER, *,
             eval_batch: PyTree | None = None, eval_fn: Callable[..., dict] | None = None,
             eval_every: int = 0, mixing: str = "auto", chunk_steps: int | None = None,
             initial_state: NodeState | None = None, update_scale: Any = None,
             mesh: jax.sharding.Mesh | None = None, unroll: int | None = None,
             has_aux: bool = False, model_state: PyTree = None, key: jax.Array | None = None,
             gossip_model_state: bool = False, consensus: bool = False,
             on_divergence: str = "raise", aggregator: Any = None) -> RunPlan:
    """Checks :func:`simulate`'s arguments before any work and builds its :class:`RunPlan`.

    Takes :func:`simulate`'s arguments (``batches`` may be an iterator: then only the
    first chunk's shapes are checked, when it is run).
    """
    if initial_state is not None:
        if not isinstance(initial_state, NodeState):
            raise ValueError(f"initial_state: must be a NodeState, got {type(initial_state)}")
        params, model_state, key = (initial_state.params, initial_state.model_state,
                                    initial_state.key)
    n = check_params(params)
    if model_state is not None:
        heads = {jnp.shape(x)[:1] for x in jax.tree.leaves(model_state)}
        if heads and heads != {(n,)}:
            raise ValueError(f"model_state: every leaf needs the leading node axis n={n}, "
                             f"got leading axes {sorted(heads)}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every: must be a non-negative integer, got {eval_every!r}")
    _check_int(chunk_steps, "chunk_steps", 1)
    _check_int(unroll, "unroll", 0)
    if eval_every and eval_batch is None:
        raise ValueError("eval_batch: required when eval_every > 0")
    if mesh is None and mixing in ("ppermute", "all_gather"):
        raise ValueError(f"mixing: {mixing!r} shards the gossip and needs mesh=")
    if on_divergence not in ("raise", "isolate"):
        raise ValueError(f"on_divergence: must be 'raise' or 'isolate', got {on_divergence!r}")
    if on_divergence == "isolate" and mesh is not None:
        raise ValueError("on_divergence: 'isolate' runs on one device; it does not take mesh=")
    rule = robust.as_aggregator(aggregator)
    if rule is not None and mesh is not None:
        raise ValueError("aggregator: robust gossip runs on one device; it does not take mesh=")
    single = "sparse" if mixing in ("ppermute", "all_gather") else mixing
    mixer = from_topology(topo, single, num_nodes=n)
    if rule is not None:
        mixer = rule.wrap(mixer)
    sim = atc(loss_fn, optimizer, mixer, has_aux=has_aux,
              stateful=model_state is not None, rng=key is not None,
              gossip_model_state=gossip_model_state, consensus=consensus,
              isolate=on_divergence == "isolate")
    state = initial_state if initial_state is not None else sim.init(params, model_state, key)
    fixed = _fixed_steps(topo)
    if not isinstance(batches, Iterator):
        total = check_batches(batches, n)
        check_loss_output(sim, state, batches)
        if fixed is not None and fixed != total:
            raise ValueError(f"topo: has {fixed} per-step matrices but batches have T={total} "
                             "steps")
    evaluation = None
    if eval_every:
        evaluation = Evaluation(eval_batch, eval_fn or loss_evaluation(
            loss_fn, has_aux, sim.stateful, sim.rng), eval_every)
    layout = None if mesh is None else parallel.node_layout(mesh, n)
    return RunPlan(sim, state, layout, mixing, fixed, check_update_scale(update_scale, n),
                   evaluation, unroll)


__all__ = [
    "CONV_UNROLL",
    "DEFAULT_OPTIMIZER",
    "Evaluation",
    "Gate",
    "NodeState",
    "RunPlan",
    "Simulator",
    "StepOutput",
    "Trajectory",
    "all_nodes_finite",
    "atc",
    "auto_unroll",
    "check_batches",
    "check_params",
    "consensus_distance",
    "evaluate_nodes",
    "final_state",
    "gate",
    "has_primitive",
    "init",
    "loss_evaluation",
    "node_finite",
    "one_node_loss_jaxpr",
    "plan_run",
    "raise_if_diverged",
    "replicate",
    "run",
    "simulate",
]
