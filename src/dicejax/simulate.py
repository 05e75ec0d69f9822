"""Decentralized SGD, adapt-then-combine (ATC), for all nodes at once.

All node states are one pytree with a leading node axis ``n``. One step (DESIGN §2.1):

1. local update, ``vmap``-ed over nodes: ``θ_k^{t+½}, s_k^{t+1} = O(θ_k^t, s_k^t, z_k^t)``
   with any optax optimizer ``O`` whose state ``s_k`` stays local to the node;
2. gossip: ``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}``.

A whole run is one ``lax.scan`` inside one ``jit`` (compiled once per shapes and static
configuration). Long runs can be fed in chunks (an iterator of batch chunks, or
``chunk_steps``), with results identical to a single scan; with ``unroll=k`` each chunk runs
as fully unrolled scans of ``k`` steps (XLA:CPU's convolutions are much faster outside a
``while`` loop; the default picks this for convolutional models on CPU).

The jax-md style building blocks are :func:`init` (a :class:`NodeState`), :func:`local_update`
(one node's adapt step), :func:`step` (one ATC step of every node) and :func:`simulate`
(a whole run, returning a :class:`Trajectory`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dicejax import parallel
from dicejax import topology as topo_lib
from dicejax.mixing import Method, Mixer, choose_method, make_mixer

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

DEFAULT_OPTIMIZER = optax.sgd(0.1)
HIGHEST = jax.lax.Precision.HIGHEST


class NodeState(NamedTuple):
    """State of every node.

    Attributes:
      params: pytree, leaves ``[n, ...]``: ``θ^t``.
      opt_state: optimizer state, leaves ``[n, ...]`` (node-local).
      step: scalar int32, the global step index ``t`` of the next step.
    """

    params: PyTree
    opt_state: PyTree
    step: jax.Array


@struct.dataclass
class Trajectory:
    """The result of :func:`simulate`.

    Attributes:
      final_params: pytree, leaves ``[n, ...]``: ``θ^T``.
      final_opt_state: optimizer state after the last step, leaves ``[n, ...]``.
      metrics: ``{"loss": [T, n]`` train loss ``L(θ_k^t; z_k^t)`` before each step,
        ``"consensus": [T]`` mean squared distance of the nodes to their average after each
        gossip, and, with periodic evaluation, ``"eval": {"step": [E], name: [E, n]}``.
      params: pytree, leaves ``[T+1, n, ...]``: ``θ^0 .. θ^T`` (``record=True``, else None).
      half_params: pytree, leaves ``[T, n, ...]``: ``θ^{½} .. θ^{T-½}`` (or None).
      opt_states: optimizer states at the start of each step and after the last,
        leaves ``[T+1, n, ...]`` (or None).
      batches: the training batches, leaves ``[T, n, B, ...]`` (or None).
      mixer: the gossip operator; ``mixer.matrices`` is ``[P, n, n]``, step ``t`` uses
        ``matrices[t % P]``.
      update_scale: ``[T, n]`` gates applied to the local updates, or None (all ones).
      start_step: global index of the first step (non-zero for resumed runs).
      optimizer: the optax transformation (static).
    """

    final_params: PyTree
    final_opt_state: PyTree
    metrics: dict
    params: PyTree | None
    half_params: PyTree | None
    opt_states: PyTree | None
    batches: PyTree | None
    mixer: Mixer
    update_scale: jax.Array | None = None
    start_step: int = struct.field(pytree_node=False, default=0)
    optimizer: optax.GradientTransformation = struct.field(
        pytree_node=False, default=DEFAULT_OPTIMIZER
    )

    @property
    def num_steps(self) -> int:
        """``T``, the number of steps run."""
        return int(self.metrics["loss"].shape[0])

    @property
    def num_nodes(self) -> int:
        """``n``."""
        return int(self.metrics["loss"].shape[1])

    @property
    def recorded(self) -> bool:
        return self.params is not None

    def matrix_at(self, t: int) -> jax.Array:
        """``W^t`` ``[n, n]`` for global step ``t``."""
        return self.mixer.matrix_at(t)

    def matrices(self, start: int = 0, stop: int | None = None) -> jax.Array:
        """Per-step matrices ``[stop - start, n, n]`` for global steps ``start..stop-1``."""
        stop = self.start_step + self.num_steps if stop is None else stop
        idx = jnp.arange(start, stop) % self.mixer.period
        return self.mixer.matrices[idx]


def replicate(params: PyTree, n: int) -> PyTree:
    """Stacks ``n`` copies of a single-node pytree: every leaf gets a leading axis ``n``.

    Args:
      params: pytree of arrays for one node.
      n: number of nodes (``>= 1``).

    Returns:
      Pytree with leaves ``[n, ...]``.
    """
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))) + 0, params)


def init(
    params: PyTree, optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER, step: int = 0
) -> NodeState:
    """Initial state of every node: ``θ^0`` and the node-local optimizer states.

    Args:
      params: pytree, leaves ``[n, ...]``.
      optimizer: optax transformation applied by every node.
      step: global step index of the first step.

    Returns:
      A :class:`NodeState`.
    """
    return NodeState(params, jax.vmap(optimizer.init)(params), jnp.asarray(step, jnp.int32))


def local_update(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    batch: PyTree,
) -> tuple[PyTree, PyTree, jax.Array]:
    """One node's adapt step: ``θ^{t+½} = θ^t + O(∇L(θ^t; z))``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` for one node.
      optimizer: optax transformation.
      params: one node's parameters (no node axis).
      opt_state: that node's optimizer state.
      batch: that node's batch, leaves ``[B, ...]``.

    Returns:
      ``(half_params, new_opt_state, loss)`` with ``loss = L(θ^t; z)``.
    """
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state, loss


def local_updates(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, state: NodeState, batch: PyTree
) -> tuple[PyTree, PyTree, jax.Array]:
    """:func:`local_update` of every node (``vmap`` over the node axis).

    Returns:
      ``(half_params [n, ...], new_opt_state [n, ...], loss [n])``.
    """
    upd = functools.partial(local_update, loss_fn, optimizer)
    return jax.vmap(upd)(state.params, state.opt_state, batch)


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


def step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mixer: Mixer,
    state: NodeState,
    batch: PyTree,
    scale: jax.Array | None = None,
    state_scale: jax.Array | None = None,
) -> tuple[NodeState, PyTree, jax.Array]:
    """One ATC step of every node.

    Args:
      loss_fn: one node's loss.
      optimizer: optax transformation.
      mixer: the gossip operator (step ``state.step`` uses ``W^{state.step}``).
      state: :class:`NodeState` at ``t``.
      batch: leaves ``[n, B, ...]``.
      scale: optional ``[n]`` gates on the parameter updates (see :func:`gate`).
      state_scale: optional ``[n]`` gates on the optimizer-state updates; default: 1 where
        ``scale`` is non-zero, 0 where it is zero (a scaled or sign-flipped sender still
        trains normally; a node whose update is dropped keeps its state).

    Returns:
      ``(state at t+1, half_params [n, ...], loss [n])``.
    """
    half, opt_state, loss = local_updates(loss_fn, optimizer, state, batch)
    if scale is not None:
        half = gate(state.params, half, scale)
        if state_scale is None:
            state_scale = (scale != 0).astype(scale.dtype)
    if state_scale is not None:
        opt_state = gate(state.opt_state, opt_state, state_scale)
    params = mixer.apply(state.step, half)
    return NodeState(params, opt_state, state.step + 1), half, loss


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "optimizer", "record", "eval_fn", "eval_every", "num_nodes",
                     "full_unroll"),
)
def _run_chunk(
    state, batches, scales, mixer, eval_batch, *, loss_fn, optimizer, record, eval_fn, eval_every,
    num_nodes=None, full_unroll=False,
):
    def body(state, xs):
        batch, scale = xs
        new_state, half, loss = step(loss_fn, optimizer, mixer, state, batch, scale)
        ys = {"loss": loss, "consensus": consensus_distance(new_state.params, num_nodes),
              "finite": _node_finite(half)}
        if record:
            ys["params"] = new_state.params
            ys["half_params"] = half
            ys["opt_states"] = new_state.opt_state
        if eval_every:
            shapes = jax.eval_shape(jax.vmap(eval_fn, in_axes=(0, None)), new_state.params,
                                    eval_batch)
            ys["eval"] = jax.lax.cond(
                new_state.step % eval_every == 0,
                lambda p: evaluate_nodes(eval_fn, p, eval_batch),
                lambda p: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes),
                new_state.params,
            )
        return new_state, ys

    # full_unroll: no XLA while loop at all (see _run_steps)
    return jax.lax.scan(body, state, (batches, scales), unroll=bool(full_unroll))


def _run_steps(state, batches, scales, mixer, eval_batch, *, unroll: int, sync: bool, **static):
    """Runs one chunk: one :func:`_run_chunk` scan (``unroll = 0``), or consecutive fully
    unrolled scans of ``unroll`` steps (the last one shorter) with their outputs concatenated,
    the same computation step for step (XLA may fuse an unrolled step differently from the
    loop body: equal up to an occasional last-bit rounding difference).

    XLA:CPU keeps the weight-gradient convolutions inside a ``while`` loop in a layout that
    falls back to a slow kernel (~10× slower); unrolled, layout assignment gives them the fast
    one (benchmarks/RESULTS.md §2, finding 4). ``sync`` blocks after each call (sharded runs:
    repeated unblocked collective calls can dead-lock on forced CPU devices, DESIGN §5).

    Returns:
      ``(state after the chunk, outputs with leading axis [T_c])``.
    """
    total = jax.tree.leaves(batches)[0].shape[0]
    if not unroll or unroll >= total:
        return _run_chunk(state, batches, scales, mixer, eval_batch, full_unroll=bool(unroll),
                          **static)
    outs = []
    for s in range(0, total, unroll):
        part = jax.tree.map(lambda x, s=s: x[s : s + unroll], batches)
        part_scales = None if scales is None else scales[s : s + unroll]
        state, ys = _run_chunk(state, part, part_scales, mixer, eval_batch, full_unroll=True,
                               **static)
        if sync:
            jax.block_until_ready(state)
        outs.append(ys)
    return state, _concat(outs)


# Steps per fully unrolled scan that unroll=None picks for convolutional models on CPU: the
# prototype (benchmarks/bench_simulate.proto_step(unroll=4)) ran the CNN 5–7× faster than one
# scan; compile time grows with the number of unrolled steps.
CONV_UNROLL = 4


def _sub_jaxprs(eqn_params: dict) -> Iterator[Any]:
    """The jaxprs among an equation's parameters (scan/while bodies, cond branches, pjit...)."""
    for value in eqn_params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr wraps a Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _has_primitive(jaxpr, name: str) -> bool:
    """Whether ``jaxpr`` (a Jaxpr or ClosedJaxpr) or any sub-jaxpr uses primitive ``name``."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(eqn.primitive.name == name
               or any(_has_primitive(sub, name) for sub in _sub_jaxprs(eqn.params))
               for eqn in jaxpr.eqns)


def _auto_unroll(loss_fn: LossFn, params: PyTree, batches: PyTree, platform: str) -> int:
    """``unroll=None``: :data:`CONV_UNROLL` on CPU when one node's loss has a convolution,
    else 0 (one ordinary scan). Traced once per shapes (``make_jaxpr`` shares the trace of
    ``_check_loss_output``)."""
    if platform != "cpu":
        return 0
    one = jax.tree.map(lambda x: x[0], params)
    batch = jax.tree.map(lambda x: x[0, 0], batches)
    jaxpr = jax.make_jaxpr(loss_fn)(one, batch)
    return CONV_UNROLL if _has_primitive(jaxpr, "conv_general_dilated") else 0


# Nodes evaluated at once on an evaluation batch of M examples: max(1, EVAL_EXAMPLES // M),
# so that evaluation memory stays bounded (16 CNN nodes on 2,000 test images at once would
# hold gigabytes of activations).
EVAL_EXAMPLES = 16384


def evaluate_nodes(eval_fn: Callable[[PyTree, PyTree], Any], params: PyTree,
                   batch: PyTree) -> Any:
    """``eval_fn(θ_k, batch)`` for every node, a bounded number of nodes at a time.

    Args:
      eval_fn: one node's evaluation (any pytree of scalars).
      params: leaves ``[n, ...]``.
      batch: evaluation batch shared by all nodes, leaves ``[M, ...]``.

    Returns:
      ``eval_fn``'s output with a leading node axis ``[n]``.
    """
    m = jax.tree.leaves(batch)[0].shape[0]
    n = jax.tree.leaves(params)[0].shape[0]
    per = max(1, EVAL_EXAMPLES // max(m, 1))
    if per >= n:
        return jax.vmap(eval_fn, in_axes=(0, None))(params, batch)
    return jax.lax.map(lambda p: eval_fn(p, batch), params, batch_size=per)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_params(params: PyTree) -> int:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params: must be a pytree with at least one array leaf")
    shapes = [jnp.shape(x) for x in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError("params: every leaf needs a leading node axis n; found a scalar leaf")
    ns = {s[0] for s in shapes}
    if len(ns) != 1:
        raise ValueError(f"params: leaves disagree on the leading node axis: {sorted(ns)}")
    for x in leaves:
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"params: leaves must be real floating arrays, got dtype {dtype}")
        if not _is_tracer(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
            raise ValueError("params: contains non-finite values (NaN or Inf)")
    return ns.pop()


def _check_callables(loss_fn, optimizer, params) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: must be callable, got {type(loss_fn).__name__}")
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer: must be an optax GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    del params


def _check_loss_output(loss_fn, params, batches) -> None:
    one = jax.tree.map(lambda x: x[0], params)
    batch = jax.tree.map(lambda x: x[0, 0], batches)
    out = jax.eval_shape(loss_fn, one, batch)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn: must return a real scalar for one node's batch, got "
                         f"{getattr(out, 'shape', out)} {getattr(out, 'dtype', '')}")


def _check_batches(batches: PyTree, n: int, name: str = "batches") -> int:
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


def _mixer_for(topo, n: int, method: Method) -> tuple[Mixer, int | None]:
    """Builds the mixer; returns it and the exact number of steps a [T, n, n] array fixes."""
    fixed_steps = None
    if not isinstance(topo, topo_lib.Topology):
        topo_lib.validate_mixing(topo, name="topo")
        fixed_steps = None if jnp.ndim(topo) == 2 else int(jnp.shape(topo)[0])
        if _is_tracer(topo):  # differentiating w.r.t. W: no concrete support to build lists
            if method == "sparse":
                raise ValueError("mixing: 'sparse' needs a concrete matrix, got a traced array")
            return make_mixer(topo[None] if topo.ndim == 2 else topo), fixed_steps
        topo = topo_lib.Topology(np.asarray(topo))
    if topo.n != n:
        raise ValueError(f"topo: matrix is for {topo.n} nodes but params have n={n} nodes")
    matrices = jnp.asarray(topo.stacked())
    indices = topo.neighbors.indices
    if choose_method(n, indices.shape[1], method) == "dense":
        return make_mixer(matrices), fixed_steps
    return make_mixer(matrices, indices), fixed_steps


def _check_scale(scale, n: int):
    if scale is None:
        return None
    try:
        arr = scale if _is_tracer(scale) else jnp.asarray(scale)
    except TypeError as e:
        raise ValueError(f"update_scale: must be a numeric array, got {type(scale)}") from e
    if not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise ValueError(f"update_scale: must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[-1] != n:
        raise ValueError(f"update_scale: must have shape [n] or [T, n] with n={n}, "
                         f"got {arr.shape}")
    if not _is_tracer(arr) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError("update_scale: contains non-finite values")
    return arr


def _node_finite(params: PyTree) -> jax.Array:
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


def _check_finite(loss: jax.Array, finite: jax.Array, offset: int) -> None:
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


def _concat(parts: list[PyTree]) -> PyTree:
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def simulate(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | Iterable[PyTree],
    topo: topo_lib.Topology | jax.Array | np.ndarray,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    record: bool = True,
    *,
    eval_batch: PyTree | None = None,
    eval_fn: Callable[[PyTree, PyTree], dict] | None = None,
    eval_every: int = 0,
    mixing: Method | parallel.ShardedMethod = "auto",
    chunk_steps: int | None = None,
    initial_state: NodeState | None = None,
    callback: Callable[[NodeState, int], None] | None = None,
    update_scale: jax.Array | np.ndarray | None = None,
    check_finite: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    unroll: int | None = None,
) -> Trajectory:
    """Simulates ATC decentralized learning for ``T`` steps.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss for ONE node.
      params: pytree, every leaf ``[n, ...]`` (:func:`replicate` helps): ``θ^0``.
      batches: pytree with every leaf ``[T, n, B, ...]``; or an *iterator* (e.g. a generator)
        of such chunks ``[T_c, n, B, ...]``, run one after the other with results identical
        to one scan over their concatenation.
      topo: a :class:`~dicejax.topology.Topology` (static or periodic), an array ``[n, n]``
        (static) or ``[T, n, n]`` (one matrix per step). Row ``k`` holds the weights node
        ``k`` receives. Gradients with respect to an array flow through the run.
      optimizer: any optax transformation; its state is local to each node.
      record: keep what influence needs: ``θ^t``, ``θ^{t+½}``, optimizer states, batches.
      eval_batch: a batch pytree ``[M, ...]`` shared by all nodes for periodic evaluation.
      eval_fn: ``eval_fn(params, batch) -> dict of scalars`` for one node (default: the loss).
      eval_every: evaluate every this many steps (``θ^t`` for ``t`` a multiple); 0 = never.
      mixing: gossip kernel, ``"auto"`` (by size and density), ``"dense"`` or ``"sparse"``;
        with a ``mesh`` also ``"ppermute"`` or ``"all_gather"`` (see :mod:`dicejax.parallel`).
      chunk_steps: split array ``batches`` into scans of this many steps (same results).
      initial_state: resume from this :class:`NodeState` instead of ``init(params)``.
      callback: called on the host after each chunk with ``(state, steps_done)``.
      update_scale: ``[n]`` or ``[T, n]`` gates on the local updates (see :func:`gate`):
        1 is ordinary training, 0 a free-rider that forwards what it receives, −1 a
        sign-flipped update, ``s`` a scaled one. Recorded in the trajectory, so influence
        re-runs reproduce it.
      check_finite: after each chunk, raise ``FloatingPointError`` naming the first step and
        node whose loss or parameters became non-finite (one host sync per chunk).
      mesh: a ``'nodes'`` device mesh (:func:`dicejax.parallel.node_mesh`): shard the node
        axis of states, optimizer states and batches over its devices (``n`` need not divide
        the device count) with the same results as one device. In a multi-process run every
        process makes the same call with the same host inputs. The trajectory's arrays stay
        sharded when the device count divides ``n``.
      unroll: run each chunk as consecutive fully unrolled scans of this many steps (a
        shorter last one compiles once more): the same computation as one scan, equal up to
        an occasional last-bit rounding difference where XLA fuses an unrolled step
        differently; 0 = one ordinary ``lax.scan`` per chunk. XLA:CPU runs convolution
        gradients inside a scan's ``while`` loop ~10× slower; unrolled, the prototype ran the
        CNN 5–7× faster (benchmarks/RESULTS.md §2). Compile time grows with ``unroll``.
        Default ``None``: 4 on the CPU backend when ``loss_fn`` contains a convolution
        (``conv_general_dilated``), else 0.

    Returns:
      A :class:`Trajectory`.

    Raises:
      ValueError: for a malformed matrix, mismatched leading axes, non-finite parameters.
      FloatingPointError: when the run diverges (``check_finite``).
    """
    if initial_state is not None:
        params = initial_state.params
    n = _check_params(params)
    _check_callables(loss_fn, optimizer, params)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every: must be a non-negative integer, got {eval_every!r}")
    if chunk_steps is not None and (isinstance(chunk_steps, bool)
                                    or not isinstance(chunk_steps, int) or chunk_steps < 1):
        raise ValueError(f"chunk_steps: must be a positive integer, got {chunk_steps!r}")
    if unroll is not None and (isinstance(unroll, bool) or not isinstance(unroll, int | np.integer)
                               or unroll < 0):
        raise ValueError(f"unroll: must be None or a non-negative integer, got {unroll!r}")
    if eval_every and eval_batch is None:
        raise ValueError("eval_batch: required when eval_every > 0")
    if eval_every and eval_fn is None:
        eval_fn = _loss_eval(loss_fn)
    if mesh is None and mixing in ("ppermute", "all_gather"):
        raise ValueError(f"mixing: {mixing!r} shards the gossip and needs mesh=")
    single = "sparse" if mixing in ("ppermute", "all_gather") else mixing
    mixer, fixed_steps = _mixer_for(topo, n, single)
    layout = None if mesh is None else parallel.node_layout(mesh, n)
    if not isinstance(batches, Iterator):
        total = _check_batches(batches, n)
        _check_loss_output(loss_fn, params, batches)
        if fixed_steps is not None and fixed_steps != total:
            raise ValueError(
                f"topo: has {fixed_steps} per-step matrices but batches have T={total} steps"
            )
    state = initial_state if initial_state is not None else init(params, optimizer)
    start = int(state.step)
    run_mixer, num_nodes = mixer, None
    if layout is not None:
        run_mixer = parallel.shard_mixer(mixer, layout, mixing)
        state = NodeState(layout.place(state.params), layout.place(state.opt_state),
                          layout.replicate(state.step))
        eval_batch = None if eval_batch is None else layout.replicate(eval_batch)
        num_nodes = n if layout.padded else None
    state0 = state
    outs, kept, kept_scales = [], [], []
    done = 0
    update_scale = _check_scale(update_scale, n)
    for chunk in _chunks(batches, chunk_steps):
        t_c = _check_batches(chunk, n)
        if fixed_steps is not None and start + done + t_c > fixed_steps:
            raise ValueError(
                f"topo: has {fixed_steps} per-step matrices but batches run past step {fixed_steps}"
            )
        scales = None
        if update_scale is not None:
            scales = (jnp.broadcast_to(update_scale, (t_c, n)) if update_scale.ndim == 1
                      else update_scale[done : done + t_c])
            if scales.shape[0] != t_c:
                raise ValueError(f"update_scale: has {update_scale.shape[0]} steps but batches "
                                 f"run past step {update_scale.shape[0]}")
            kept_scales.append(scales)
        if unroll is None:
            platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
            unroll = _auto_unroll(loss_fn, params, chunk, platform)
        if layout is not None:
            chunk = layout.place(chunk, axis=1)
            scales = None if scales is None else layout.place(scales, axis=1, fill=1)
        state, ys = _run_steps(
            state,
            chunk,
            scales,
            run_mixer,
            eval_batch,
            unroll=int(unroll),
            sync=layout is not None,
            loss_fn=loss_fn,
            optimizer=optimizer,
            record=record,
            eval_fn=eval_fn,
            eval_every=eval_every,
            num_nodes=num_nodes,
        )
        if check_finite and not _is_tracer(ys["loss"]):
            if layout is None:
                _check_finite(ys["loss"], ys["finite"], start + done)
            else:
                _check_finite(parallel.to_host(ys["loss"])[:, :n],
                              parallel.to_host(ys["finite"])[:, :n], start + done)
        outs.append(ys)
        if record:
            kept.append(chunk)
        done += t_c
        if callback is not None:
            callback(state if layout is None else _trim_state(layout, state), done)
    if not outs:
        raise ValueError("batches: the iterator yielded no chunks (T = 0 steps)")
    ys = _concat(outs)
    state0_trimmed = state0
    if layout is not None:  # drop the padded nodes, two jitted slices in all
        consensus = ys.pop("consensus")
        if record:
            ys["batches"] = _concat(kept)
        ys = dict(layout.trim(ys, axis=1), consensus=consensus)
        p, o, p0, o0 = layout.trim((state.params, state.opt_state, state0.params,
                                    state0.opt_state))
        state, state0_trimmed = NodeState(p, o, state.step), NodeState(p0, o0, state0.step)
    metrics = {"loss": ys["loss"], "consensus": ys["consensus"]}
    if eval_every:
        steps = np.arange(start + 1, start + done + 1)
        sel = np.flatnonzero(steps % eval_every == 0)
        metrics["eval"] = {"step": jnp.asarray(steps[sel])}
        metrics["eval"].update(jax.tree.map(lambda x: x[sel], ys["eval"]))
    if record:
        prepend = functools.partial(jax.tree.map, lambda a, b: jnp.concatenate([a[None], b]))
        s0 = state0_trimmed
        rec = dict(
            params=prepend(s0.params, ys["params"]),
            half_params=ys["half_params"],
            opt_states=prepend(s0.opt_state, ys["opt_states"]),
            batches=_concat(kept) if layout is None else ys["batches"],
        )
    else:
        rec = dict(params=None, half_params=None, opt_states=None, batches=None)
    return Trajectory(
        final_params=state.params,
        final_opt_state=state.opt_state,
        metrics=metrics,
        mixer=mixer,
        update_scale=_concat(kept_scales) if kept_scales else None,
        start_step=start,
        optimizer=optimizer,
        **rec,
    )


def _trim_state(layout: parallel.NodeLayout, state: NodeState) -> NodeState:
    """A padded, sharded :class:`NodeState` cut back to the real nodes."""
    params, opt_state = layout.trim((state.params, state.opt_state))
    return NodeState(params, opt_state, state.step)


@functools.cache
def _loss_eval(loss_fn: LossFn) -> Callable[[PyTree, PyTree], dict]:
    def evaluate(params, batch):
        return {"loss": loss_fn(params, batch)}

    return evaluate


def final_state(traj: Trajectory) -> NodeState:
    """The :class:`NodeState` after the last step of a trajectory (to resume a run)."""
    return NodeState(
        traj.final_params,
        traj.final_opt_state,
        jnp.asarray(traj.start_step + traj.num_steps, jnp.int32),
    )


__all__ = [
    "DEFAULT_OPTIMIZER",
    "NodeState",
    "Trajectory",
    "consensus_distance",
    "final_state",
    "init",
    "local_update",
    "local_updates",
    "replicate",
    "simulate",
    "step",
]
