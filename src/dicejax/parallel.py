"""The node axis sharded over devices and hosts.

All node states are stacked with a leading node axis ``n`` (DESIGN §1), so scaling out is
sharding that one axis over a 1-D device mesh with axis name ``'nodes'``: device ``i`` holds
nodes ``i·b .. (i+1)·b − 1`` of every state, optimizer state and batch, with
``b = ceil(n / d)`` for ``d`` devices. When ``d`` does not divide ``n`` the node axis is
padded to ``n_pad = d·b``; a padded node only ever receives from itself (``W[k, k] = 1``)
and no real node receives from it, so it cannot change any real node, and every output is
trimmed back to ``n`` nodes (the padding trains on a copy of node 0's data, which keeps it
finite).

Local updates are ``vmap``-ed over nodes and need no communication. Gossip is the only step
that moves data; :func:`shard_mixer` builds one of three sharded kernels:

* ``"dense"`` — ``W`` ``[n, n]`` sharded by rows and one matrix product left to GSPMD (XLA
  gathers the ``[n, P]`` parameter buffer). Needed for gradients with respect to ``W``.
* ``"ppermute"`` — a halo exchange inside :func:`jax.shard_map`: for every device shift
  ``Δ`` that some edge crosses, one :func:`jax.lax.ppermute` sends exactly the rows the
  device ``Δ`` further on needs (a ring moves one boundary row each way, a one-peer graph
  its peer's slice), then a local neighbour-list gather. A time-varying schedule gets one
  exchange per phase of its period (``lax.switch``), so each step moves only that phase's
  slices.
* ``"all_gather"`` — :func:`jax.lax.all_gather` of the buffer, then the local neighbour-list
  gather: for arbitrary sparse graphs whose edges reach most devices.

``"sparse"`` picks ``"ppermute"`` when its exchange receives fewer rows per device than an
all-gather would (``(d − 1)·b``), else ``"all_gather"``. Every kernel computes the same
``Σ_d W[k, idx[k, d]] θ_idx[k, d]`` as the single-device kernels of :mod:`dicejax.mixing`,
so sharded runs equal single-device runs to rounding.

Many hosts: call :func:`jax.distributed.initialize` in every process before anything else
touches JAX, then :func:`node_mesh` spans the devices of all processes (``jax.devices()``)
and every process runs the same ``simulate(..., mesh=mesh)`` on the same host inputs.
See ``docs/parallel.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dicejax import pytrees
from dicejax.mixing import Mixer, choose_method, flat_apply
from dicejax.pytrees import tree_bytes
from dicejax.simulator import NodeState, StepOutput

PyTree = Any
AXIS = "nodes"
ShardedMethod = Literal["auto", "dense", "sparse", "ppermute", "all_gather"]
SHARDED_METHODS = ("auto", "dense", "sparse", "ppermute", "all_gather")

# A periodic schedule with at most this many phases gets one halo exchange per phase
# (``lax.switch``); a longer one gets a single exchange over the union of its supports.
MAX_SWITCH_PHASES = 32


# --------------------------------------------------------------------------------------------
# Meshes and the padded node layout
# --------------------------------------------------------------------------------------------


def node_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D device mesh with the axis ``'nodes'``.

    Args:
      devices: the devices to shard the node axis over, in order (device ``i`` holds the
        ``i``-th block of nodes). Default: ``jax.devices()``, every device of every process
        (after :func:`jax.distributed.initialize`, all hosts).

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``(len(devices),)`` with ``Auto`` axis type
      (GSPMD propagates shardings through the simulator).

    Raises:
      ValueError: ``devices`` is empty, holds something that is not a device, or repeats one.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices: must name at least one device")
    if not all(isinstance(x, jax.Device) for x in devs):
        raise ValueError(f"devices: must be jax devices, got {[type(x).__name__ for x in devs]}")
    if len({id(x) for x in devs}) != len(devs):
        raise ValueError("devices: lists a device more than once")
    return Mesh(np.array(devs, dtype=object), (AXIS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def _check_mesh(mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: must be a jax.sharding.Mesh (see node_mesh), got "
                         f"{type(mesh).__name__}")
    if tuple(mesh.axis_names) != (AXIS,):
        raise ValueError(f"mesh: must be 1-D with the axis name {AXIS!r} (see node_mesh), got "
                         f"axes {tuple(mesh.axis_names)}")
    return mesh


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as a numpy array on this host.

    Arrays whose shards all live in this process (or are fully replicated) are read
    directly; others are gathered from every process
    (:func:`jax.experimental.multihost_utils.process_allgather`; every process must call).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _put(x, sharding: NamedSharding, transform=None) -> jax.Array:
    """``transform(x)`` (default ``x``) placed with ``sharding``: tracers, global arrays
    and host arrays."""
    if transform is None:
        if isinstance(x, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(x, sharding)
        transform = lambda y: y  # noqa: E731
        if isinstance(x, jax.Array) and jax.process_count() == 1:
            return jax.device_put(x, sharding)  # device to device
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(transform(x), sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(transform, out_shardings=sharding)(x)
    # host arrays are padded on the host: no per-shape compilation, and each device
    # receives only its own shard
    host = np.asarray(transform(np.asarray(x)))
    if jax.process_count() == 1:  # only each device's shard is transferred
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where each node lives: ``n`` nodes in blocks of ``b`` over the mesh's ``d`` devices.

    Attributes:
      mesh: the 1-D ``'nodes'`` mesh.
      num_nodes: ``n``, the real nodes.
    """

    mesh: Mesh
    num_nodes: int

    @property
    def num_devices(self) -> int:
        """``d``."""
        return int(self.mesh.devices.size)

    @property
    def block(self) -> int:
        """``b = ceil(n / d)``, nodes per device."""
        return -(-self.num_nodes // self.num_devices)

    @property
    def padded_nodes(self) -> int:
        """``n_pad = d·b``."""
        return self.block * self.num_devices

    @property
    def padded(self) -> bool:
        return self.padded_nodes != self.num_nodes

    def sharding(self, axis: int) -> NamedSharding:
        """The sharding of an array whose node axis is ``axis``."""
        return NamedSharding(self.mesh, P(*([None] * axis), AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def _pad(self, x, axis: int, fill):
        size = x.shape[axis]
        if size == self.padded_nodes:
            return x
        if size != self.num_nodes:
            raise ValueError(f"expected {self.num_nodes} (or {self.padded_nodes}) nodes along "
                             f"axis {axis}, got shape {tuple(x.shape)}")
        extra = self.padded_nodes - self.num_nodes
        xp = np if isinstance(x, np.ndarray) else jnp
        if fill is None:  # copies of node 0 (finite wherever node 0 is)
            edge = xp.take(x, xp.zeros((extra,), np.int32), axis=axis)
        else:
            shape = list(x.shape)
            shape[axis] = extra
            edge = xp.full(shape, fill, x.dtype)
        return xp.concatenate([x, edge], axis=axis)

    def place(self, tree: PyTree, axis: int = 0, fill: float | None = None) -> PyTree:
        """Pads every leaf's node axis to ``n_pad`` and shards it over the mesh.

        Args:
          tree: pytree, every leaf with ``n`` (or already ``n_pad``) along ``axis``: host or
            device arrays (in a multi-process run the same values in every process) or
            global arrays.
          axis: the node axis (0 for states ``[n, ...]``, 1 for batches ``[T, n, ...]``).
          fill: value of the padded entries; ``None`` copies node 0.

        Returns:
          The pytree with leaves ``[..., n_pad, ...]`` sharded along ``axis``.
        """
        sharding = self.sharding(axis)

        def one(x):
            if np.shape(x)[axis] == self.padded_nodes:
                return _put(x, sharding)
            return _put(x, sharding, lambda y: self._pad(y, axis, fill))

        return jax.tree.map(one, tree)

    def replicate(self, tree: PyTree) -> PyTree:
        """Places every leaf, whole, on every device of the mesh."""
        return jax.tree.map(lambda x: _put(x, self.replicated), tree)

    def trim(self, tree: PyTree, axis: int = 0) -> PyTree:
        """Drops the padded nodes: leaves ``[..., n_pad, ...]`` → ``[..., n, ...]``.

        Without padding the leaves are returned as they are (still sharded); with padding
        the result cannot be split evenly over the devices and comes back replicated.
        """
        if not self.padded:
            return tree
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
            return _trim_tree(tree, self.num_nodes, axis)
        return _trim_jit(tree, self.num_nodes, axis)

    def place_state(self, state: NodeState) -> NodeState:
        """A :class:`~dicejax.simulator.NodeState` padded and sharded (``step``/``key``
        replicated)."""
        return NodeState(self.place(state.params), self.place(state.opt_state),
                         self.replicate(state.step), self.place(state.model_state),
                         None if state.key is None else self.replicate(state.key))

    def trim_state(self, state: NodeState, axis: int = 0) -> NodeState:
        """A padded :class:`~dicejax.simulator.NodeState` cut back to the real nodes (its
        node axis is ``axis``: 0 for one state, 1 for states stacked over steps)."""
        params, opt_state, model_state = self.trim(
            (state.params, state.opt_state, state.model_state), axis=axis)
        return state._replace(params=params, opt_state=opt_state, model_state=model_state)

    def trim_outputs(self, outs: StepOutput) -> StepOutput:
        """:func:`dicejax.run` outputs ``[T, n_pad, ...]`` cut back to the real nodes."""
        if not self.padded:
            return outs
        per_node = outs._replace(consensus=None, state=None)
        trimmed = self.trim(per_node, axis=1)
        return trimmed._replace(
            consensus=outs.consensus,
            state=None if outs.state is None else self.trim_state(outs.state, axis=1))


def _trim_tree(tree: PyTree, n: int, axis: int) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, n, axis=axis), tree)


_trim_jit = jax.jit(_trim_tree, static_argnums=(1, 2))


def node_layout(mesh: Mesh, num_nodes: int) -> NodeLayout:
    """The :class:`NodeLayout` of ``num_nodes`` nodes on ``mesh`` (validated)."""
    _check_mesh(mesh)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer) \
            or num_nodes < 1:
        raise ValueError(f"num_nodes: must be a positive integer, got {num_nodes!r}")
    return NodeLayout(mesh, int(num_nodes))


# --------------------------------------------------------------------------------------------
# Halo exchange plans (numpy, built once per run)
# --------------------------------------------------------------------------------------------


class HaloPlan(NamedTuple):
    """Which rows each device sends, and where every neighbour lands on the receiver.

    For ``d`` devices holding ``b`` rows each. Each device assembles a *pool*: its own
    ``b`` rows, then the rows received for each shift (in ``shifts`` order), then one row
    of zeros (the target of padded neighbour slots).

    Attributes:
      shifts: ``((Δ, m), ...)``: device ``s`` sends ``m`` rows to device ``(s + Δ) mod d``.
      send: one ``[d, m]`` int32 table per shift: the local rows device ``s`` sends
        (padded with row 0 when it has fewer than ``m``).
      gather: ``[n_pad, D]`` int32 position in the receiving device's pool of each
        in-neighbour slot of each node.
      pool_size: ``b + Σ m + 1``.
    """

    shifts: tuple[tuple[int, int], ...]
    send: tuple[np.ndarray, ...]
    gather: np.ndarray
    pool_size: int

    @property
    def rows_received(self) -> int:
        """Rows each device receives per gossip step, ``Σ m`` over the shifts."""
        return sum(m for _, m in self.shifts)


def halo_plan(sources: np.ndarray, num_devices: int) -> HaloPlan:
    """Builds the halo exchange for a padded neighbour list.

    Args:
      sources: ``[n_pad, D]`` int global index of each in-neighbour slot, ``-1`` for an
        empty slot; ``n_pad`` a multiple of ``num_devices``.
      num_devices: ``d``.

    Returns:
      The :class:`HaloPlan`.
    """
    src = np.asarray(sources, np.int64)
    n_pad, width = src.shape
    d = int(num_devices)
    if n_pad % d:
        raise ValueError(f"sources: {n_pad} rows do not split over {d} devices")
    b = n_pad // d
    dst_dev = np.broadcast_to((np.arange(n_pad) // b)[:, None], src.shape)
    valid = src >= 0
    shift = np.where(valid, (dst_dev - src // b) % d, -1)
    pos = np.full(src.shape, -1, np.int64)
    own = valid & (shift == 0)
    pos[own] = src[own] % b
    remote = valid & (shift > 0)
    r_shift, r_dst, r_row = shift[remote], dst_dev[remote], src[remote] % b
    shifts: list[tuple[int, int]] = []
    sends: list[np.ndarray] = []
    offset = b
    if remote.any():
        # one group per (shift, receiving device); its rows sorted and deduplicated
        key = (r_shift * d + r_dst) * b + r_row
        uniq, inverse = np.unique(key, return_inverse=True)
        group = uniq // b
        starts = np.searchsorted(group, group, side="left")
        rank = np.arange(uniq.size) - starts  # position of the row within its group
        remote_pos = np.empty(uniq.size, np.int64)
        for delta in np.unique(group // d):
            sel = (group // d) == delta
            m = int(rank[sel].max()) + 1
            table = np.zeros((d, m), np.int32)
            receiver = group[sel] % d
            table[(receiver - delta) % d, rank[sel]] = (uniq[sel] % b).astype(np.int32)
            remote_pos[sel] = offset + rank[sel]
            shifts.append((int(delta), m))
            sends.append(table)
            offset += m
        pos[remote] = remote_pos[inverse.reshape(-1)]
    pos[pos < 0] = offset  # the zero row
    del width
    return HaloPlan(tuple(shifts), tuple(sends), pos.astype(np.int32), offset + 1)


# --------------------------------------------------------------------------------------------
# The sharded gossip operator
# --------------------------------------------------------------------------------------------


def _dense_kernel(mesh, matrices, t, buf):
    w = matrices[0] if matrices.shape[0] == 1 else matrices[t % matrices.shape[0]]
    out = jnp.matmul(w.astype(buf.dtype), buf, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(AXIS, None)))


def _pool_mix(pool, gather, weights, phase):
    """``Σ_d w[k, d] pool[gather[k, d]]`` for the local rows (``weights [Pw, b, D]``)."""
    w = weights[0] if weights.shape[0] == 1 else weights[phase % weights.shape[0]]
    return jnp.einsum("kd,kdc->kc", w.astype(pool.dtype), jnp.take(pool, gather, axis=0),
                      precision=jax.lax.Precision.HIGHEST)


def _halo_kernel(mesh, shifts, send, gather, weights, t, buf):
    d = int(mesh.devices.size)

    def local(buf, send, gather, weights, t):
        parts = [buf]
        for (delta, _), rows in zip(shifts, send, strict=True):
            piece = jnp.take(buf, rows[0], axis=0)
            perm = [(s, (s + delta) % d) for s in range(d)]
            parts.append(jax.lax.ppermute(piece, AXIS, perm=perm))
        parts.append(jnp.zeros((1, buf.shape[1]), buf.dtype))
        return _pool_mix(jnp.concatenate(parts), gather, weights, t)

    specs = (P(AXIS, None), tuple(P(AXIS, None) for _ in send), P(AXIS, None),
             P(None, AXIS, None), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(AXIS, None))(
        buf, tuple(send), gather, weights, t)


def _gather_kernel(mesh, gather, weights, t, buf):
    def local(buf, gather, weights, t):
        full = jax.lax.all_gather(buf, AXIS, axis=0, tiled=True)
        pool = jnp.concatenate([full, jnp.zeros((1, buf.shape[1]), buf.dtype)])
        return _pool_mix(pool, gather, weights, t)

    specs = (P(AXIS, None), P(AXIS, None), P(None, AXIS, None), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(AXIS, None))(
        buf, gather, weights, t)


@pytrees.dataclass
class ShardedMixer:
    """The gossip operator of a sharded run (a pytree that enters ``jit`` and ``scan``).

    Used in place of :class:`dicejax.mixing.Mixer` by :func:`dicejax.simulate.step`; acts on
    stacked pytrees whose leaves are ``[n_pad, ...]``, sharded over the mesh.

    Attributes:
      matrices: ``"dense"``: ``[P, n_pad, n_pad]`` padded per-step matrices, sharded by rows;
        otherwise None.
      gather: per halo phase (``"ppermute"``) or one (``"all_gather"``) ``[n_pad, D]`` int32
        pool positions of the in-neighbour slots.
      weights: matching ``[Pw, n_pad, D]`` neighbour weights.
      send: per halo phase, the ``[d, m]`` send tables of its shifts (``"ppermute"``).
      method: ``"dense"``, ``"ppermute"`` or ``"all_gather"`` (static).
      mesh: the ``'nodes'`` mesh (static).
      shifts: per halo phase, its ``((Δ, m), ...)`` (static).
      period: ``P``, the schedule's period (static).
    """

    matrices: jax.Array | None
    gather: tuple
    weights: tuple
    send: tuple
    method: str = pytrees.static_field()
    mesh: Mesh = pytrees.static_field()
    shifts: tuple = pytrees.static_field(default=())
    period: int = pytrees.static_field(default=1)

    @property
    def rows_received(self) -> int | None:
        """Most rows a device receives in one gossip step (``"ppermute"``; else None)."""
        if self.method != "ppermute":
            return None
        return max(sum(m for _, m in phase) for phase in self.shifts)

    def _kernel(self, t):
        if self.method == "dense":
            return lambda buf: _dense_kernel(self.mesh, self.matrices, t, buf)
        if self.method == "all_gather":
            return lambda buf: _gather_kernel(self.mesh, self.gather[0], self.weights[0], t, buf)
        phases = [
            (lambda buf, i=i: _halo_kernel(self.mesh, self.shifts[i], self.send[i],
                                            self.gather[i], self.weights[i], t, buf))
            for i in range(len(self.shifts))
        ]
        if len(phases) == 1:
            return phases[0]
        return lambda buf: jax.lax.switch(t % self.period, phases, buf)

    def apply(self, t, tree: PyTree) -> PyTree:
        """Gossip of the stacked, sharded pytree ``tree`` (leaves ``[n_pad, ...]``) at step
        ``t``."""
        return flat_apply(self._kernel(t), tree)


def _padded_sources(mixer: Mixer, layout: NodeLayout) -> tuple[np.ndarray, np.ndarray]:
    """``[n_pad, D]`` global sources (−1 empty) and ``[P, n_pad, D]`` weights, padded rows
    receiving only from themselves."""
    n, n_pad = layout.num_nodes, layout.padded_nodes
    idx = np.asarray(mixer.indices).astype(np.int64)
    w = np.asarray(mixer.weights)
    src = np.where(idx < n, idx, -1)
    src_pad = np.full((n_pad, src.shape[1]), -1, np.int64)
    src_pad[:n] = src
    src_pad[n:, 0] = np.arange(n, n_pad)
    w_pad = np.zeros((w.shape[0], n_pad, w.shape[2]), w.dtype)
    w_pad[:, :n] = w
    w_pad[:, n:, 0] = 1.0
    return src_pad, w_pad


def _compact(src: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops the slots whose weight is zero in ``w`` ``[n_pad, D]`` (one phase)."""
    keep = (w != 0) & (src >= 0)
    width = max(int(keep.sum(axis=1).max()), 1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(src, order, axis=1), -1),
            np.where(kept, np.take_along_axis(w, order, axis=1), 0.0))


def _halo_phases(src, w, d: int) -> list[tuple[HaloPlan, np.ndarray]]:
    """One (plan, weights ``[1, n_pad, D]``) per phase, or one union plan for long periods."""
    if w.shape[0] == 1 or w.shape[0] > MAX_SWITCH_PHASES:
        return [(halo_plan(src, d), w)]
    out = []
    for p in range(w.shape[0]):
        s, wp = _compact(src, w[p])
        out.append((halo_plan(s, d), wp[None]))
    return out


def shard_mixer(mixer: Mixer, layout: NodeLayout, method: ShardedMethod = "auto"
                ) -> ShardedMixer:
    """The sharded gossip operator of a run (see the module docstring for the kernels).

    Args:
      mixer: the single-device mixer of the run (:func:`dicejax.mixing.make_mixer`);
        ``"ppermute"``/``"all_gather"``/``"sparse"`` need its neighbour list
        (``mixer.indices``, a concrete graph).
      layout: where the nodes live.
      method: ``"dense"``, ``"ppermute"``, ``"all_gather"``; ``"sparse"`` picks the halo
        exchange when it receives fewer rows per device than an all-gather; ``"auto"`` picks
        dense or sparse as the single-device ``"auto"`` does, then as ``"sparse"``.

    Returns:
      The :class:`ShardedMixer`, its arrays placed on the mesh.
    """
    if method not in SHARDED_METHODS:
        raise ValueError(f"mixing: must be one of {SHARDED_METHODS}, got {method!r}")
    mesh, d, n = layout.mesh, layout.num_devices, layout.num_nodes
    if method == "auto":
        method = ("dense" if mixer.indices is None
                  else choose_method(n, mixer.indices.shape[1], "auto"))
    if method == "dense":
        m = mixer.matrices
        extra = layout.padded_nodes - n
        if extra:  # padded nodes receive only from themselves
            xp = jnp if isinstance(m, jax.core.Tracer) else np
            m = xp.pad(xp.asarray(m), ((0, 0), (0, extra), (0, extra)))
            m = m + xp.diag((xp.arange(layout.padded_nodes) >= n).astype(m.dtype))[None]
        m = layout.place(m, axis=1)
        return ShardedMixer(m, (), (), (), "dense", mesh, (), int(m.shape[0]))
    if mixer.indices is None:
        raise ValueError(f"mixing: {method!r} needs a concrete graph with a neighbour list; "
                         "give a Topology or a concrete matrix, or use 'dense'")
    src, w = _padded_sources(mixer, layout)
    period = int(w.shape[0])
    if method in ("sparse", "ppermute"):
        phases = _halo_phases(src, w, d)
        received = max(plan.rows_received for plan, _ in phases)
        if method == "ppermute" or received < (d - 1) * layout.block:
            sharded_rows = layout.sharding(0)
            return ShardedMixer(
                None,
                tuple(_put(plan.gather, sharded_rows) for plan, _ in phases),
                tuple(layout.place(pw, axis=1) for _, pw in phases),
                tuple(tuple(_put(s, sharded_rows) for s in plan.send)
                      for plan, _ in phases),
                "ppermute", mesh, tuple(plan.shifts for plan, _ in phases), period)
    n_pad = layout.padded_nodes
    gather = np.where(src >= 0, src, n_pad).astype(np.int32)
    return ShardedMixer(None, (_put(gather, layout.sharding(0)),),
                        (layout.place(w, axis=1),), (), "all_gather", mesh, (),
                        period)


# --------------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------------


class MemoryModel(NamedTuple):
    """Bytes one node needs on its device (see :func:`memory_model`).

    Attributes:
      params: ``θ`` of one node.
      opt_state: its optimizer state.
      activations: what the backward pass keeps for one local update on one batch (the
        residuals of ``jax.vjp`` of the loss: layer inputs and outputs, plus any parameter
        a layer's backward needs), 0 when no loss and batch were given.
      batch: one step's training batch of one node.
      workspace: temporary bytes XLA assigns to one node's gradient on the backend where
        the model was made (``compiled=True``; includes the activations and any
        convolution workspace), else 0.
    """

    params: int
    opt_state: int
    activations: int
    batch: int
    workspace: int = 0

    def per_node(self, steps: int = 1, record: bool = False) -> int:
        """Peak bytes per node in a run of ``steps`` steps in one scan.

        ``θ^t``, ``θ^{t+½}``, the gradient and the gossiped ``θ^{t+1}`` (4 × params), the
        old and new optimizer states, the activations (or the compiled workspace, whichever
        is larger) and the batches of all ``steps`` steps; ``record=True`` adds
        ``θ^1..θ^T``, ``θ^{½}..θ^{T-½}`` and the optimizer states of every step.
        """
        live = (4 * self.params + 2 * self.opt_state + max(self.activations, self.workspace)
                + steps * self.batch)
        if record:
            live += steps * (2 * self.params + self.opt_state)
        return int(live)

    def per_device(self, n: int, devices: int = 1, *, steps: int = 1, record: bool = False,
                   mixing: Literal["dense", "ppermute", "all_gather"] = "ppermute",
                   period: int = 1, degree: int = 3, halo_rows: int = 2,
                   itemsize: int = 4) -> int:
        """Peak bytes on one of ``devices`` devices for ``n`` nodes.

        ``ceil(n/d)`` nodes (:meth:`per_node`) plus the gossip's own buffers: ``"dense"``
        keeps its rows of the ``P`` matrices (``P·n_pad²/d`` entries) and gathers every
        node's parameters (``n_pad × params``); ``"all_gather"`` gathers them too and keeps
        ``P × degree`` weights and indices per local node; ``"ppermute"`` receives
        ``halo_rows`` rows (2 for a ring) and keeps the same neighbour tables.
        """
        b = -(-n // devices)
        n_pad = b * devices
        total = b * self.per_node(steps, record)
        tables = period * b * degree * (itemsize + 4)
        if mixing == "dense":
            total += period * n_pad * b * itemsize + n_pad * self.params
        elif mixing == "all_gather":
            total += n_pad * self.params + tables
        elif mixing == "ppermute":
            total += halo_rows * self.params + tables
        else:
            raise ValueError(f"mixing: must be 'dense', 'ppermute' or 'all_gather', "
                             f"got {mixing!r}")
        return int(total)

    def max_nodes(self, device_bytes: int, devices: int = 1, *, headroom: float = 0.9,
                  **kwargs: Any) -> int:
        """Largest ``n`` whose :meth:`per_device` fits ``headroom × device_bytes``.

        Args:
          device_bytes: memory of one device (e.g. ``80e9`` for an 80 GB card).
          devices: ``d``.
          headroom: fraction of the memory the run may use (XLA and the framework keep
            the rest).
          **kwargs: as in :meth:`per_device`.

        Returns:
          The largest ``n`` (0 when not even one node fits).
        """
        budget = headroom * float(device_bytes)
        if self.per_device(1, devices, **kwargs) > budget:
            return 0
        lo, hi = 1, 2
        while self.per_device(hi, devices, **kwargs) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.per_device(mid, devices, **kwargs) <= budget else (lo, mid)
        return lo


def memory_model(params: PyTree, optimizer: optax.GradientTransformation | None = None,
                 loss_fn=None, batch: PyTree | None = None, *,
                 compiled: bool = False) -> MemoryModel:
    """Bytes per node for parameters, optimizer state, activations and one batch.

    Counted from shapes only (:func:`jax.eval_shape`: nothing is allocated or run), except
    ``compiled=True``, which compiles one node's gradient for the default backend and reads
    XLA's temporary buffer size (convolutions may need several times their activations).

    Args:
      params: ONE node's parameters (no node axis), arrays or shape structs.
      optimizer: the optax transformation every node runs (default plain SGD: no state).
      loss_fn: ``loss_fn(params, batch) -> scalar`` (for the activations).
      batch: one node's batch for one step, leaves ``[B, ...]``.
      compiled: also measure :attr:`MemoryModel.workspace` (needs ``loss_fn`` and ``batch``).

    Returns:
      A :class:`MemoryModel`.
    """
    if not jax.tree.leaves(params):
        raise ValueError("params: must be a pytree with at least one array leaf")
    opt = jax.eval_shape((optimizer or optax.sgd(0.1)).init, params)
    acts = work = 0
    if (loss_fn is None or batch is None) and compiled:
        raise ValueError("compiled: needs loss_fn and batch")
    if loss_fn is not None and batch is not None:
        res = jax.eval_shape(lambda p, z: jax.vjp(lambda q: loss_fn(q, z), p)[1], params, batch)
        acts = tree_bytes(res)
        if compiled:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  (params, batch))
            stats = jax.jit(jax.grad(loss_fn)).lower(*shapes).compile().memory_analysis()
            work = int(getattr(stats, "temp_size_in_bytes", 0) or 0)
    return MemoryModel(tree_bytes(params), tree_bytes(opt), acts,
                       0 if batch is None else tree_bytes(batch), work)


__all__ = [
    "AXIS",
    "HaloPlan",
    "MemoryModel",
    "NodeLayout",
    "ShardedMixer",
    "halo_plan",
    "memory_model",
    "node_layout",
    "node_mesh",
    "shard_mixer",
    "to_host",
]
