"""Reach-restricted cascades: a source's perturbation lives only on the nodes it has reached.

Source ``j``'s update at step ``t`` changes, ``s`` steps later, only the nodes of its
time-respecting reach ``R_s(j)`` (``R_0 = {j}``, ``R_s = R_{s-1} ∪ {k : W^{t+s-1}[k, i] > 0,
i ∈ R_{s-1}}``, DESIGN §2.2). Every other node keeps its recorded state. So the exact
counterfactual re-run of ``j`` (DICE-GT) and its first-order perturbation (DICE-E) need only
``Σ_s |R_s(j)|`` node updates instead of ``r·n``: linear in ``n`` on bounded-degree graphs.

The reach of every source is computed on the host from the run's neighbour lists
(:func:`reach_tables`) as padded index sets with static shapes — ``nodes[s]`` ``[m, M_s]``,
the reached nodes of each of ``m`` sources at hop ``s``, ``M_s = max_j |R_s(j)|``, padded with
the out-of-range index ``n`` like jax-md's neighbour lists. Inside ``jit`` a re-run for one
source (:func:`restricted_states`, ``vmap``-ed over sources) steps only the reached nodes:
the local updates of ``R_{s-1}``, then the gossip into ``R_s``, where an in-neighbour outside
``R_{s-1}`` contributes its recorded half step ``θ_i^{u+½}``, and a node newly reached keeps
its recorded optimizer state. With ``α = 1`` this reproduces the recorded run on the reached
nodes; with ``α = 0`` it is the counterfactual; its ``jvp`` in ``α`` is the DICE-E
perturbation ``δ`` on the reached nodes (exactly zero elsewhere).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence.rerun import gates_at, tree_at
from dicejax.mixing import Mixer
from dicejax.simulator import Gate, NodeState, Simulator, as_gate
from dicejax.simulator import gate as apply_gate
from dicejax.trajectory import Trajectory

PyTree = Any


#: Host reach computations process this many (source, node) pairs at a time.
HOST_CHUNK = 1 << 24


class NeighbourList(NamedTuple):
    """The in-neighbour lists of a run's gossip (host arrays).

    Attributes:
      indices: ``[n, D]`` int32 in-neighbours of every node (union over the period), padded
        with ``n``.
      weights: ``[P, n, D]`` ``W^p[k, indices[k, d]]`` of each phase (0 at padded slots).
    """

    indices: np.ndarray
    weights: np.ndarray


def neighbour_list(mixer: Mixer) -> NeighbourList:
    """The in-neighbour lists of ``mixer`` (its own for the sparse kernel, else built from
    its matrices on the host)."""
    if mixer.indices is not None:
        return NeighbourList(np.asarray(mixer.indices), np.asarray(mixer.weights))
    mats = np.asarray(mixer.matrices)
    support = (mats != 0).any(axis=0)
    n = support.shape[0]
    width = max(int(support.sum(axis=1).max()), 1)
    order = np.argsort(~support, axis=1, kind="stable")[:, :width]
    real = np.take_along_axis(support, order, axis=1)
    indices = np.where(real, order, n).astype(np.int32)
    safe = np.minimum(indices, n - 1)
    weights = np.where(real[None], np.take_along_axis(mats, np.broadcast_to(
        safe, mats.shape[:1] + safe.shape), axis=-1), 0.0)
    return NeighbourList(indices, weights)


class ReachTables(NamedTuple):
    """The padded reach of ``m`` sources over ``r`` hops (host ``int32`` arrays).

    Attributes:
      nodes: ``r + 1`` arrays ``[m, M_s]``: the nodes of ``R_s(j)`` in increasing order,
        padded with ``n``; ``nodes[0]`` is ``[m, 1]``, the sources.
      src_pos: ``r`` arrays ``[m, M_s, D]``: for slot ``d`` of node ``nodes[s][j, p]``, the
        position of that in-neighbour in ``nodes[s-1][j]``, or ``M_{s-1}`` when it is not
        there (its recorded half step is gossiped).
      prev_pos: ``r`` arrays ``[m, M_s]``: the position of ``nodes[s][j, p]`` in
        ``nodes[s-1][j]``, or ``M_{s-1}`` when it is newly reached at hop ``s``.
    """

    nodes: tuple[np.ndarray, ...]
    src_pos: tuple[np.ndarray, ...]
    prev_pos: tuple[np.ndarray, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(M_0, .., M_r)``: the padded reach size of each hop."""
        return tuple(int(x.shape[1]) for x in self.nodes)

    def device(self) -> ReachTables:
        """The tables as device arrays (to pass into ``jit``)."""
        return jax.tree.map(jnp.asarray, self)


def _positions(reach: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted member lists ``[m, M]`` (padded with ``n``) and the position map ``[m, n + 1]``
    (``M`` for non-members and for the padding index ``n``) of boolean reach rows."""
    m = reach.shape[0]
    counts = reach.sum(axis=1)
    width = max(int(counts.max()), 1)
    rows, cols = np.nonzero(reach)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(rows.size) - starts[rows]
    nodes = np.full((m, width), n, np.int32)
    nodes[rows, rank] = cols
    pos = np.full((m, n + 1), width, np.int32)
    pos[rows, cols] = rank
    return nodes, pos


def reach_tables(nbrs: NeighbourList, phases: np.ndarray, sources: np.ndarray) -> ReachTables:
    """The time-respecting reach of ``sources`` through the steps of ``phases``.

    Args:
      nbrs: the run's in-neighbour lists.
      phases: ``[r]`` the phase (``global step % P``) of each of the ``r`` steps
        ``t .. t+r-1``.
      sources: ``[m]`` source nodes.

    Returns:
      The :class:`ReachTables`.
    """
    idx = nbrs.indices
    n = idx.shape[0]
    m = len(sources)
    reach = np.zeros((m, n + 1), bool)  # column n: the padding index, never reached
    reach[np.arange(m), sources] = True
    nodes, src_pos, prev_pos = [], [], []
    members, pos = _positions(reach[:, :n], n)
    nodes.append(members)
    for p in np.asarray(phases):
        live = nbrs.weights[p] > 0  # [n, D] edges of this step
        new = reach.copy()
        rows = max(1, HOST_CHUNK // max(1, n * idx.shape[1]))
        for a in range(0, m, rows):  # k receives from a reached in-neighbour along a live edge
            hit = reach[a : a + rows][:, idx] & live[None]  # [rows, n, D]
            new[a : a + rows, :n] |= hit.any(axis=2)
        members_s, pos_s = _positions(new[:, :n], n)
        # slot d of reached node k: where its in-neighbour sits among the previous reach
        nb = idx[np.minimum(members_s, n - 1)]  # [m, M_s, D]
        nb = np.where((members_s < n)[..., None], nb, n)
        src_pos.append(np.take_along_axis(pos, nb.reshape(m, -1), axis=1).reshape(nb.shape))
        prev_pos.append(np.take_along_axis(pos, members_s, axis=1))
        nodes.append(members_s)
        reach, pos = new, pos_s
    return ReachTables(tuple(nodes), tuple(src_pos), tuple(prev_pos))


def reach_is_cheaper(sizes: tuple[int, ...], n: int, kind: str) -> bool:
    """Whether the reach-restricted cascade updates no more nodes than the dense one.

    Per source, the dense forward cascade propagates a tangent through all ``n`` nodes at
    each of the ``r`` hops (its primal is shared by the sources); the restricted one updates
    the ``M_0 + .. + M_{r-1}`` reached nodes, with primal and tangent (twice the work). The
    dense ground truth re-runs all ``n`` nodes ``r`` times; the restricted one the reached
    nodes once. Measured on the digits MLP: the 16-node exponential graph at r = 3 (reach 1,
    5, 11, 16) runs 1.4x faster restricted, though its third hop reaches every node.
    """
    work = (2 if kind == "e" else 1) * sum(sizes[:-1])
    return work <= (len(sizes) - 1) * n


def step_phases(traj: Trajectory, t: int, hops: int) -> np.ndarray:
    """``[r]`` the mixer phases of the local steps ``t .. t+r-1``."""
    return (traj.start_step + t + np.arange(hops)) % traj.mixer.period


# --------------------------------------------------------------------------------------------
# One source's re-run on its reach (traced; vmap over sources)
# --------------------------------------------------------------------------------------------


def _take(tree: PyTree, idx: jax.Array) -> PyTree:
    """Rows ``idx`` of every leaf (padded indices read the last row: finite, masked later)."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0, mode="clip"), tree)


def _take_nodes(state: NodeState, idx: jax.Array) -> NodeState:
    """The per-node fields of ``state`` at the nodes ``idx`` (step and key shared)."""
    params, opt, ms = _take((state.params, state.opt_state, state.model_state), idx)
    return state._replace(params=params, opt_state=opt, model_state=ms)


def _pick(cur: PyTree, rec: PyTree, pos: jax.Array, size: int) -> PyTree:
    """``cur[pos]`` where ``pos < size`` (a re-run value), else ``rec`` (the recorded one)."""

    def one(c, r):
        got = jnp.take(c, jnp.minimum(pos, size - 1), axis=0)
        mask = (pos < size).reshape(pos.shape + (1,) * (c.ndim - 1))
        return jnp.where(mask, got, r)

    return jax.tree.map(one, cur, rec)


def _gossip(half: PyTree, rec_half: PyTree, src_pos: jax.Array, nbr: jax.Array,
            w: jax.Array, size: int) -> PyTree:
    """``Σ_d w[p, d] · (half[src_pos[p, d]] or rec_half[nbr[p, d]])`` for every reached
    node ``p`` (the padded neighbour-list gossip, restricted)."""

    def one(h, r):
        out = None
        for d in range(src_pos.shape[1]):  # D is static: one fused loop per leaf
            got = jnp.take(h, jnp.minimum(src_pos[:, d], size - 1), axis=0)
            other = jnp.take(r, nbr[:, d], axis=0, mode="clip")
            mask = (src_pos[:, d] < size).reshape((-1,) + (1,) * (h.ndim - 1))
            term = w[:, d].astype(h.dtype).reshape((-1,) + (1,) * (h.ndim - 1)) * jnp.where(
                mask, got, other)
            out = term if out is None else out + term
        return out

    return jax.tree.map(one, half, rec_half)


def restricted_states(sim: Simulator, traj: Trajectory, t, nodes, src_pos, prev_pos,
                      nbr_idx: jax.Array, nbr_w: jax.Array, alpha: jax.Array) -> list[NodeState]:
    """One source's re-run of ``r`` steps from local step ``t``, on its reach only.

    Args:
      sim: the re-run simulator (its loss form and optimizer).
      traj: the recorded trajectory.
      t: local step (may be traced).
      nodes, src_pos, prev_pos: this source's rows of :class:`ReachTables` (``r + 1``,
        ``r`` and ``r`` arrays; device arrays).
      nbr_idx: ``[n, D]`` in-neighbour lists; ``nbr_w``: ``[r, n, D]`` their weights at the
        steps ``t .. t+r-1``.
      alpha: scalar gate of the source's update at step ``t`` (1 = the run, 0 = removed).

    Returns:
      ``r`` :class:`NodeState` s, the one after hop ``s`` with leaves ``[M_s, ...]`` on
      ``nodes[s]`` (padded positions hold finite values of no meaning).
    """
    state = _take_nodes(traj.state_at(t), nodes[0])
    out = []
    for s in range(1, len(nodes)):
        u = t + s - 1
        prev, cur, size = nodes[s - 1], nodes[s], nodes[s - 1].shape[0]
        batch = _take(tree_at(traj.batches, u), prev)
        keys = sim.keys_for(state.key, state.step, prev)
        half, opt, ms, _, _ = jax.vmap(sim.local_update)(
            state.params, state.opt_state, state.model_state, batch, keys)
        own = gates_at(traj, u, 1)
        own = None if own is None else _take(tree_at(own, 0), prev)
        if s == 1:
            g = (Gate(alpha[None], alpha[None]) if own is None
                 else Gate(own.update * alpha, own.state * alpha))
        else:
            g = as_gate(own)
        if g is not None:
            half = apply_gate(state.params, half, g.update)
            opt = apply_gate(state.opt_state, opt, g.state)
            if sim.stateful:
                ms = apply_gate(state.model_state, ms, g.state)
        nbr, w = _take(nbr_idx, cur), _take(nbr_w[s - 1], cur)
        w = jnp.where((cur < nbr_idx.shape[0])[:, None], w, 0)
        params = _gossip(half, tree_at(traj.half_params, u), src_pos[s - 1], nbr, w, size)
        rec = _take_nodes(traj.state_at(t + s), cur)
        opt = _pick(opt, rec.opt_state, prev_pos[s - 1], size)
        if sim.stateful and sim.gossip_model_state:
            ms = _gossip(ms, tree_at(traj.half_model_states, u), src_pos[s - 1], nbr, w, size)
        elif sim.stateful:
            ms = _pick(ms, rec.model_state, prev_pos[s - 1], size)
        state = NodeState(params, opt, state.step + 1, ms, state.key)
        out.append(state)
    return out


def node_update(sim: Simulator, params: PyTree, opt: PyTree, batch: PyTree, key,
                update_gate: jax.Array | None = None, state_gate: jax.Array | None = None
                ) -> tuple[PyTree, PyTree]:
    """One node's gated local update ``(θ^{u+½}, s^{u+1})`` (no node axis, no model state).

    Args:
      sim: the re-run simulator; params, opt, batch, key: the node's ``θ^u``, optimizer
        state, batch and PRNG key (None without ``rng``).
      update_gate, state_gate: scalar gates of the parameter and optimizer-state updates
        (:func:`dicejax.simulator.gate`; None: 1).
    """
    half, new_opt = sim.local_update(params, opt, None, batch, key)[:2]
    lead = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    drop = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    if update_gate is not None:
        half = drop(apply_gate(lead(params), lead(half), update_gate[None]))
    if state_gate is not None:
        new_opt = drop(apply_gate(lead(opt), lead(new_opt), state_gate[None]))
    return half, new_opt


#: :func:`edge_cotangents` pulls back this many edges at a time (one vmap below it).
EDGE_CHUNK = 4096


def edge_cotangents(sim: Simulator, traj: Trajectory, u, nbr_idx: jax.Array, w: jax.Array,
                    g: PyTree) -> tuple[PyTree, PyTree]:
    """Every edge's pull-back of its receiver's probe gradient through one local update.

    The last hop of a first-order cascade reads the perturbation ``δ^u`` of a source only
    through ``g_k^{u+1} · δ_k^{u+1} = Σ_d w[k, d] ⟨J_iᵀ g_k^{u+1}, δ_i^u⟩``, ``i = nbr_idx[k, d]``,
    where ``J_i`` is the Jacobian of node ``i``'s gated local update at the recorded step
    ``u`` (``(θ_i, s_i) ↦ θ_i^{u+½}``, optimizer state included). These ``n·D`` vector-Jacobian
    products are shared by every source: a cascade that takes them needs no tangent through
    the update of step ``u`` (``Σ_j |R_{r-1}(j)|`` Jacobian-vector products replaced by
    ``n·D`` vector-Jacobian products; the last hop becomes inner products).

    Args:
      sim: the re-run simulator (not stateful: the probe reads the parameters only).
      traj: the recorded trajectory.
      u: local step (may be traced).
      nbr_idx: ``[n, D]`` in-neighbour lists (padded with ``n``); w: ``[n, D]`` their weights
        at step ``u`` (0 at padded slots).
      g: ``[n, ...]`` parameter-shaped probe gradients ``g_k^{u+1}`` of every node.

    Returns:
      ``(params, opt_state)`` cotangents with leaves ``[n, D, ...]``: ``w[k, d] J_iᵀ g_k``
      (exactly zero where ``w`` is 0, whatever node ``i`` holds).
    """
    state = traj.state_at(u)
    n, width = nbr_idx.shape
    edges = jnp.minimum(nbr_idx.reshape(-1), n - 1)  # [E]
    live = w.reshape(-1) != 0
    own = gates_at(traj, u, 1)
    xs = (*_take((state.params, state.opt_state, tree_at(traj.batches, u)), edges),
          sim.keys_for(state.key, state.step, edges),
          None if own is None else jnp.take(own.update[0], edges),
          jax.tree.map(lambda x: jnp.repeat(x, width, axis=0) * w.reshape(
              (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), g))

    def one(edge):
        params, opt, batch, key, sigma, cot = edge
        half = lambda p, o: node_update(sim, p, o, batch, key, sigma)[0]  # noqa: E731
        return jax.vjp(half, params, opt)[1](cot)

    if edges.shape[0] <= EDGE_CHUNK:
        out = jax.vmap(one)(xs)
    else:
        out = jax.lax.map(one, xs, batch_size=EDGE_CHUNK)
    # masked after the pull-back: exactly zero on dead edges even where i holds NaN
    live_mask = lambda x: jnp.where(  # noqa: E731
        live.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0) if x.dtype != jax.dtypes.float0 else x
    out = jax.tree.map(live_mask, out)
    return jax.tree.map(lambda x: x.reshape((n, width, *x.shape[1:])), out)


def last_hop(cot: tuple[PyTree, PyTree], tangent: NodeState, nodes: jax.Array,
             src_pos: jax.Array) -> jax.Array:
    """``[M_r]`` ``g_k · δ_k`` of the last hop from :func:`edge_cotangents` and one source's
    tangents at the hop before.

    The inner products ``⟨w[k, d] J_iᵀ g_k, δ_i⟩`` come from one matrix product of the
    source's tangents with the cotangents: of every edge when the reach covers much of the
    graph (``n ≤ 4 M_r``: no gather of parameter-sized rows, which XLA:CPU runs slowly under
    ``vmap``), else of the edges into the reached nodes only.

    Args:
      cot: :func:`edge_cotangents` ``[n, D, ...]``.
      tangent: the source's perturbation of the states at hop ``r − 1``, leaves
        ``[M_{r-1}, ...]`` on its reach ``R_{r-1}``.
      nodes: ``[M_r]`` its reach at hop ``r``; src_pos: ``[M_r, D]`` where each in-neighbour
        sits in ``R_{r-1}`` (``M_{r-1}``: not reached, no perturbation).
    """
    size = jax.tree.leaves(tangent.params)[0].shape[0]
    n, width = jax.tree.leaves(cot)[0].shape[:2]
    every = n <= 4 * nodes.shape[0]
    rows = cot if every else _take(cot, nodes)  # [n or M_r, D, ...]
    gram = _gram(rows, (tangent.params, tangent.opt_state), 2, 1)  # [n or M_r, D, M_{r-1}]
    which = jnp.minimum(nodes, n - 1) if every else jnp.arange(nodes.shape[0])
    picked = gram[which[:, None], jnp.arange(width)[None], jnp.minimum(src_pos, size - 1)]
    return jnp.sum(jnp.where(src_pos < size, picked, 0), axis=1)


def _is_float(x) -> bool:
    return x.dtype != jax.dtypes.float0 and jnp.issubdtype(x.dtype, jnp.inexact)


def _gram(a: PyTree, b: PyTree, lead_a: int, lead_b: int) -> jax.Array | None:
    """``Σ_leaves ⟨a[α], b[β]⟩`` for every pair of leading indices: ``[*A, *B]`` (float leaves
    only: integer leaves have no tangent); None when no leaf is a float (e.g. SGD's empty
    optimizer state)."""
    la, lb = "abcd"[:lead_a], "efgh"[:lead_b]
    total = None
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if not (_is_float(x) and _is_float(y)):
            continue
        term = jnp.einsum(f"{la}p,{lb}p->{la}{lb}", x.reshape((*x.shape[:lead_a], -1)),
                          y.reshape((*y.shape[:lead_b], -1)))
        total = term if total is None else total + term
    return total


def _spread(v: PyTree, scale: jax.Array) -> PyTree:
    """``scale[j, p] · v[j]`` flattened to ``[m·M, ...]`` (float0 leaves stay zero)."""
    m, width = scale.shape

    def one(x):
        shape = (m * width, *x.shape[1:])
        if not _is_float(x):
            return np.zeros(shape, jax.dtypes.float0)
        return (scale.astype(x.dtype).reshape((m, width) + (1,) * (x.ndim - 1))
                * x[:, None]).reshape(shape)

    return jax.tree.map(one, v)


def flat_values(sim: Simulator, traj: Trajectory, t, tables: ReachTables, nbr_idx: jax.Array,
                nbr_w: jax.Array, g: list, cot: tuple[PyTree, PyTree] | None) -> list[jax.Array]:
    """Every source's first-order values ``g_k · δ_k`` on its reach, ``r ≤ 3``, with no
    tangent carried per source: meet in the middle.

    Source ``j``'s perturbation after hop 1 is its update ``v_j = (v_j^θ, v_j^s)`` times the
    gossip weight, ``δ_k^{t+1} = (W^t[k, j] v_j^θ, [k = j] v_j^s)``. So:

    * hop 1 reads ``W^t[k, j] ⟨g_k^{t+1}, v_j^θ⟩``: one matrix product of the ``n`` probe
      gradients with the ``m`` updates;
    * at ``r = 3`` hop 2 needs each hop-1 perturbation pushed through the update of step
      ``t + 1``: ``e_{j,l} = J_l^{t+1} δ_l^{t+1}`` for every reached ``l ∈ R_1(j)``, one flat
      ``vmap`` of ``Σ_j |R_1(j)|`` Jacobian-vector products (the per-source form runs the same
      products padded and gathered per source). ``δ_i^{t+2} = (Σ_d W^{t+1}[i, l_d] e_{j,l_d}^θ,
      e_{j,i}^s)``, so hop 2 reads inner products of ``g^{t+2}`` with the ``e``;
    * the last hop (``r ≥ 2``) reads ``Σ_d ⟨w[k, d] J_iᵀ g_k, δ_i⟩`` from the edge pull-backs
      ``cot`` (:func:`edge_cotangents`): inner products of ``cot`` with ``v`` (``r = 2``) or
      with the ``e`` (``r = 3``).

    Everything parameter-sized is a product of a few matrices: ``[n, m]``, ``[n, m, M_1]``,
    ``[n, D, m]`` or ``[n, D, m, M_1]`` inner products, then small gathers combine them with
    the weights along each source's reach. The same values as :func:`restricted_states` and
    :func:`last_hop` (tested to 1e-12 in float64).

    Args:
      sim: the re-run simulator (not stateful); traj: the recorded trajectory; t: local step
        (may be traced).
      tables: the sources' :class:`ReachTables` (device arrays), ``r ≤ 3`` hops.
      nbr_idx: ``[n, D]`` in-neighbour lists; nbr_w: ``[r, n, D]`` their weights at the steps
        ``t .. t+r-1``.
      g: ``r`` probe-gradient pairs ``(params, model_state)`` of every node at hops ``1..r``
        (leaves ``[n, ...]``).
      cot: :func:`edge_cotangents` of step ``t + r − 1`` (``r ≥ 2``; else None).

    Returns:
      ``r`` arrays ``[m, M_s]``: the value at each reached node of each hop (padded
      positions: finite, of no meaning).
    """
    nodes, src_pos, prev_pos = tables
    hops = len(nodes) - 1
    if not 1 <= hops <= 3:
        raise ValueError(f"flat_values: needs 1 <= r <= 3 hops, got {hops}")
    n, width = nbr_idx.shape
    m, size1 = nodes[1].shape
    rows = jnp.arange(m)
    one = jnp.ones((), jax.tree.leaves(traj.params)[0].dtype)

    # every source's update tangent v_j = (v^θ, v^s) at step t
    sources = nodes[0][:, 0]
    state = traj.state_at(t)
    src = _take_nodes(state, sources)
    own = gates_at(traj, t, 1)
    su = None if own is None else jnp.take(own.update[0], sources)
    ss = None if own is None else jnp.take(own.state[0], sources)

    def update_tangent(p, o, batch, key, su, ss):
        def f(a):
            return node_update(sim, p, o, batch, key, a if su is None else su * a,
                               a if ss is None else ss * a)

        return jax.jvp(f, (one,), (one,))[1]

    v_par, v_opt = jax.vmap(update_tangent)(
        src.params, src.opt_state, _take(tree_at(traj.batches, t), sources),
        sim.keys_for(state.key, state.step, sources), su, ss)

    # hop 1: δ_k = (W^t[k, j] v_j^θ, [k = j] v_j^s) on k ∈ R_1(j)
    k1 = jnp.minimum(nodes[1], n - 1)  # [m, M_1]
    live1 = nodes[1] < n
    w_in = jnp.where(src_pos[0] == 0, jnp.take(nbr_w[0], k1, axis=0), 0).sum(-1)
    w_in = jnp.where(live1, w_in, 0)  # [m, M_1] the weight node k gives the source
    itself = live1 & (prev_pos[0] == 0)  # k is the source (it keeps v^s)
    a1 = _gram(g[0][0], v_par, 1, 1)  # [n, m]
    values = [w_in * a1[k1, rows[:, None]]]
    if hops == 1:
        return values
    cot_par, cot_opt = cot
    d_ax = jnp.arange(width)
    if hops == 2:  # the last hop from the edge pull-backs of step t + 1, against v
        c_par, c_opt = _gram(cot_par, v_par, 2, 1), _gram(cot_opt, v_opt, 2, 1)  # [n, D, m]
        k2 = jnp.minimum(nodes[2], n - 1)[..., None]  # [m, M_2, 1]
        pos = src_pos[1]  # [m, M_2, D]: where in-neighbour i sits in R_1(j)
        ok = pos < size1
        pos_c = jnp.minimum(pos, size1 - 1)
        at = (k2, d_ax, rows[:, None, None])
        term = w_in[rows[:, None, None], pos_c] * c_par[at]
        if c_opt is not None:
            term = term + itself[rows[:, None, None], pos_c] * c_opt[at]
        return [*values, jnp.where(ok, term, 0).sum(-1)]

    # r = 3: push every hop-1 perturbation through its node's update of step t + 1
    st1 = traj.state_at(t + 1)
    flat = k1.reshape(-1)
    own1 = gates_at(traj, t + 1, 1)
    e_par, e_opt = jax.vmap(
        lambda p, o, batch, key, gu, gs, dp, do: jax.jvp(
            lambda p, o: node_update(sim, p, o, batch, key, gu, gs), (p, o), (dp, do))[1]
    )(*_take((st1.params, st1.opt_state, tree_at(traj.batches, t + 1)), flat),
      sim.keys_for(st1.key, st1.step, flat),
      None if own1 is None else jnp.take(own1.update[0], flat),
      None if own1 is None else jnp.take(own1.state[0], flat),
      _spread(v_par, w_in), _spread(v_opt, itself))
    unflat = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x.reshape((m, size1, *x.shape[1:])), tree)
    e_par, e_opt = unflat(e_par), unflat(e_opt)  # [m, M_1, ...]

    # hop 2: δ_i^θ = Σ_d W^{t+1}[i, d] e_{j, pos(d)}^θ on i ∈ R_2(j)
    size2 = nodes[2].shape[1]
    k2 = jnp.minimum(nodes[2], n - 1)  # [m, M_2]
    w2 = jnp.where((nodes[2] < n)[..., None], jnp.take(nbr_w[1], k2, axis=0), 0)  # [m, M_2, D]
    pos1 = src_pos[1]  # [m, M_2, D]
    ok1 = pos1 < size1
    pos1_c = jnp.minimum(pos1, size1 - 1)
    a2 = _gram(g[1][0], e_par, 1, 2)  # [n, m, M_1]
    values.append(jnp.where(ok1, w2 * a2[k2[..., None], rows[:, None, None], pos1_c], 0).sum(-1))

    # hop 3 from the pull-backs of step t + 2: Σ_d ⟨cot[k, d], δ_i⟩, i = nbr[k, d] ∈ R_2(j)
    b_par, b_opt = _gram(cot_par, e_par, 2, 2), _gram(cot_opt, e_opt, 2, 2)  # [n, D, m, M_1]
    k3 = jnp.minimum(nodes[3], n - 1)[..., None]  # [m, M_3, 1]
    pos2 = src_pos[2]  # [m, M_3, D]: where i sits in R_2(j)
    ok2 = pos2 < size2
    pos2_c = jnp.minimum(pos2, size2 - 1)
    r3 = rows[:, None, None]
    inner = pos1[r3, pos2_c]  # [m, M_3, D, D']: where i's in-neighbours sit in R_1(j)
    w_i = w2[r3, pos2_c]  # [m, M_3, D, D']
    par = jnp.where(inner < size1, w_i * b_par[k3[..., None], d_ax[:, None], r3[..., None],
                                                 jnp.minimum(inner, size1 - 1)], 0).sum(-1)
    mine = prev_pos[1][r3, pos2_c]  # [m, M_3, D]: where i sits in R_1(j) (keeps e^s)
    if b_opt is not None:
        par = par + jnp.where(mine < size1, b_opt[k3, d_ax, r3, jnp.minimum(mine, size1 - 1)],
                              0)
    values.append(jnp.where(ok2, par, 0).sum(-1))
    return values


def weights_at(traj: Trajectory, nbrs: NeighbourList, t: int, hops: int) -> np.ndarray:
    """``[r, n, D]`` neighbour weights of the local steps ``t .. t+r-1`` (host arrays: the
    phases are known before the program runs)."""
    w = np.asarray(nbrs.weights)
    return w[(traj.start_step + t + np.arange(hops)) % w.shape[0]]


__all__ = [
    "EDGE_CHUNK",
    "HOST_CHUNK",
    "NeighbourList",
    "ReachTables",
    "edge_cotangents",
    "flat_values",
    "last_hop",
    "neighbour_list",
    "node_update",
    "reach_is_cheaper",
    "reach_tables",
    "restricted_states",
    "step_phases",
    "weights_at",
]
