"""DICE-GT and DICE-E for every source node at once (DESIGN §2.2–2.4).

Sign convention: an influence is a change in probe loss caused by the source's update;
negative means the data **helped** (it lowered the probe loss).

Both are computed as a cascade: the source's direct term plus, for every hop ``s = 1..r``,
the effect ``C_s[k, j]`` of source ``j``'s update on node ``k``'s probe loss at step ``t+s``
(weighted by ``q_k``), with the time-respecting shells. The paper's scores (Definitions 2–3,
Proposition 1, Theorem 1) and the network-level reading are reductions of that one object.
Two forms compute it for ``m`` sources (default every node):

* **dense** (:class:`Cascade`, ``matrix [r, n, m]``): the ground truth re-runs the whole
  network ``m + 1`` times (``vmap``-ed); the forward estimate linearises the ``r``-step
  re-run once and applies its linear map to the ``m`` unit gates. Cost ``O(m · r · n)`` node
  updates — for small graphs, or when a source reaches most nodes within ``r`` hops.
* **reach-restricted** (:class:`SparseCascade`, per source the reached nodes and their
  values, :mod:`dicejax.influence.reach`): each source re-runs only the nodes it has reached
  (``R_s(j)``), the rest keep their recorded states. Cost ``O(m · Σ_s |R_s|)``: linear in
  ``n`` on bounded-degree graphs. Equal to the dense form up to rounding.

``mode="auto"`` picks the reach-restricted form when it updates no more nodes than the dense
one (:func:`~dicejax.influence.reach.reach_is_cheaper`): on every sparse graph, and at one hop
even on dense ones. Sources are processed in
chunks under a memory budget (:mod:`dicejax.influence.budget`).

The adjoint estimate of the network-level reading (:func:`dice_e_network`) is one
``jax.vjp`` of the re-run for every source at once (``O(r)`` vmapped HVPs).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence import budget as budget_lib
from dicejax.influence import reach as reach_lib
from dicejax.influence.budget import balanced_chunk
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
from dicejax.mixing import Mixer
from dicejax.pytrees import dataclass as pytree_dataclass
from dicejax.pytrees import shape_key, shape_structs, static_field
from dicejax.simulate import has_primitive, scalar_loss
from dicejax.simulator import LossFn, Simulator
from dicejax.trajectory import Trajectory

PyTree = Any
Mode = Literal["auto", "dense", "reach"]


class Cascade(NamedTuple):
    """Influence of ``m`` source nodes' updates at one step, hop by hop (dense form).

    Attributes:
      direct: ``[m]`` each source's effect on its own probe loss at ``t+½``, ``q_j (...)``.
      matrix: ``[r, n, m]``; ``matrix[s-1, k, i] = q_k [L(θ_k^{t+s}) − L(θ̃_k^{t+s}(j))]``
        for source ``j = sources[i]`` (exact, or its estimate) — who influences whom at hop
        ``s``.
      shells: ``[r, n, m]`` bool; ``shells[s-1, k, i]``: ``k`` first reached from source
        ``sources[i]`` at hop ``s``.
      sources: ``[m]`` the source nodes (every node, in order, by default).
    """

    direct: jax.Array
    matrix: jax.Array
    shells: jax.Array
    sources: jax.Array | None = None

    @property
    def hops(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def per_hop(self) -> jax.Array:
        """``[r, m]``: ``Σ_{k ∈ S_s(j)} C_s[k, j]`` for each hop ``s`` and source ``j``."""
        return jnp.sum(jnp.where(self.shells, self.matrix, 0), axis=1)

    @property
    def total(self) -> jax.Array:
        """``[m]``: the r-hop DICE score of every source (direct term + every shell)."""
        return _dense_total(self.direct, self.shells, self.matrix)

    def network(self, hops: int | None = None, *, horizon: int | None = None) -> jax.Array:
        """``[m]``: ``Σ_k C_h[k, j]``, the effect on all nodes at step ``t+h``.

        Args:
          hops: ``h`` in ``[1, r]`` (default ``r``); ``horizon=`` is its deprecated name.
        """
        h = _check_network_hops(self.hops, _renamed_horizon(hops, horizon, None))
        return jnp.sum(self.matrix[h - 1], axis=0)

    @property
    def network_per_hop(self) -> jax.Array:
        """``[r, m]``: :meth:`network` at every hop ``h = 1..r``."""
        return jnp.sum(self.matrix, axis=1)

    def dense(self, num_nodes: int | None = None) -> Cascade:
        """This cascade (already dense)."""
        del num_nodes
        return self


@pytree_dataclass
class SparseCascade:
    """The reach-restricted form of :class:`Cascade`: per source, its reached nodes only.

    Entries of ``C_s[k, j]`` outside ``R_s(j)`` are exactly zero (the source cannot have
    changed those nodes yet), so the readings are those of the dense form: ``direct``,
    ``total``, ``per_hop``, ``network(h)``, ``network_per_hop``, ``sources``; ``matrix`` and
    ``shells`` too, built densely on access (``[r, n, m]``: mind the memory at large ``n``).

    Attributes:
      direct: ``[m]`` as in :class:`Cascade`.
      nodes: ``r`` arrays ``[m, M_s]``: the nodes of ``R_s(j)`` of each source (increasing,
        padded with ``n``).
      values: ``r`` arrays ``[m, M_s]``: ``C_s[nodes, j]`` (0 at padded positions).
      in_shell: ``r`` arrays ``[m, M_s]`` bool: the node is first reached at hop ``s``.
      sources: ``[m]`` the source nodes.
      num_nodes: ``n`` (static).
    """

    direct: jax.Array
    nodes: tuple
    values: tuple
    in_shell: tuple
    sources: jax.Array
    num_nodes: int = static_field()

    @property
    def hops(self) -> int:
        return len(self.values)

    @property
    def per_hop(self) -> jax.Array:
        """``[r, m]``: ``Σ_{k ∈ S_s(j)} C_s[k, j]``."""
        return jnp.stack([jnp.sum(jnp.where(s, v, 0), axis=1)
                          for s, v in zip(self.in_shell, self.values, strict=True)])

    @property
    def total(self) -> jax.Array:
        """``[m]``: the r-hop DICE score of every source."""
        return _sparse_total(self.direct, self.in_shell, self.values)

    def network(self, hops: int | None = None, *, horizon: int | None = None) -> jax.Array:
        """``[m]``: ``Σ_k C_h[k, j]`` (over the reached nodes: the others are zero)."""
        h = _check_network_hops(self.hops, _renamed_horizon(hops, horizon, None))
        return jnp.sum(self.values[h - 1], axis=1)

    @property
    def network_per_hop(self) -> jax.Array:
        """``[r, m]``: :meth:`network` at every hop ``h = 1..r``."""
        return jnp.stack([jnp.sum(v, axis=1) for v in self.values])

    def dense(self, num_nodes: int | None = None) -> Cascade:
        """The same cascade as a dense :class:`Cascade` (``matrix [r, n, m]``: small ``n``).

        Args:
          num_nodes: ``n`` (default :attr:`num_nodes`).
        """
        num_nodes = self.num_nodes if num_nodes is None else num_nodes
        m = self.sources.shape[0]
        cols = jnp.arange(m)[:, None]
        mats, shell = [], []
        for nodes, values, first in zip(self.nodes, self.values, self.in_shell, strict=True):
            mats.append(jnp.zeros((num_nodes + 1, m), values.dtype).at[nodes, cols].set(values))
            shell.append(jnp.zeros((num_nodes + 1, m), bool).at[nodes, cols].set(first))
        return Cascade(self.direct, jnp.stack(mats)[:, :num_nodes],
                       jnp.stack(shell)[:, :num_nodes], self.sources)

    @property
    def matrix(self) -> jax.Array:
        """``[r, n, m]`` as :attr:`Cascade.matrix` (built densely)."""
        return self.dense().matrix

    @property
    def shells(self) -> jax.Array:
        """``[r, n, m]`` bool as :attr:`Cascade.shells` (built densely)."""
        return self.dense().shells


@jax.jit
def _dense_total(direct, shells, matrix):
    """``direct + Σ_s Σ_{k ∈ S_s(j)} C_s[k, j]`` (one compiled program, not eager ops)."""
    return direct + jnp.sum(jnp.where(shells, matrix, 0), axis=(0, 1))


@jax.jit
def _sparse_total(direct, in_shell, values):
    """:meth:`SparseCascade.total` as one compiled program."""
    return direct + sum(jnp.sum(jnp.where(s, v, 0), axis=1)
                        for s, v in zip(in_shell, values, strict=True))


def _check_network_hops(r: int, hops: int | None) -> int:
    h = r if hops is None else hops
    if isinstance(h, bool) or not isinstance(h, int | np.integer) or not 1 <= h <= r:
        raise ValueError(f"hops: must be in [1, {r}], got {h!r}")
    return int(h)


def _renamed_horizon(hops, horizon, default):
    """``horizon=`` is the deprecated name of ``hops=`` (one name for the idea)."""
    if horizon is None:
        return default if hops is None else hops
    warnings.warn("horizon= is deprecated; use hops= (the same number of later steps)",
                  DeprecationWarning, stacklevel=3)
    if hops is not None and hops != horizon:
        raise ValueError(f"hops and horizon: give one of them, got {hops} and {horizon}")
    return horizon


# ``batch_size`` splits the sources into at most this many chunks unrolled in one program
# (losses with a convolution on CPU only); otherwise chunks run as a ``lax.map`` loop
MAX_UNROLLED_CHUNKS = 32


def map_sources(fn, xs, batch_size: int | None, unroll: bool = True):
    """``vmap`` of ``fn`` over ``xs``: all at once, or in equal chunks of ``batch_size``.

    Chunks bound memory. The sources are padded (repeating the last one) to a whole number of
    chunks, so that one chunk shape compiles. With ``unroll`` (losses with a convolution on
    CPU), up to :data:`MAX_UNROLLED_CHUNKS` chunks are unrolled one after the other in the
    program rather than looped with ``lax.map``: XLA:CPU runs convolutions inside a while
    loop 4-6x slower than outside one (benchmarks/RESULTS.md §2, finding 4). Otherwise one
    ``lax.map`` (one compiled chunk).
    """
    m = jax.tree.leaves(xs)[0].shape[0]
    if batch_size is None or batch_size >= m:
        return jax.vmap(fn)(xs)
    chunks = -(-m // batch_size)
    if unroll and chunks <= MAX_UNROLLED_CHUNKS:
        parts = [jax.vmap(fn)(jax.tree.map(lambda x, s=s: x[s : s + batch_size], xs))
                 for s in range(0, m, batch_size)]
        return jax.tree.map(lambda *p: jnp.concatenate(p), *parts)
    pad = chunks * batch_size - m
    padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), xs)
    out = jax.lax.map(fn, padded, batch_size=batch_size)
    return jax.tree.map(lambda y: y[:m], out)


def half_vars(traj: Trajectory, t) -> tuple[PyTree, PyTree]:
    """``(θ^{t+½}, s^{t+½})``: the probe variables right after the local updates of step
    ``t`` (before gossip)."""
    ms = None if traj.half_model_states is None else tree_at(traj.half_model_states, t)
    return tree_at(traj.half_params, t), ms


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


def _direct(sim, traj, probe, t, q, sources, *, order: int, direct: str, exact: bool):
    """``[m]`` the direct terms ``q_j (L(θ_j^{t+½}) − L(θ_j^t))`` (exact) or their Taylor
    estimate, of the sources only."""
    theta = jax.tree.map(lambda x: x[sources], probe_vars(traj.state_at(t)))
    half = jax.tree.map(lambda x: x[sources], half_vars(traj, t))
    if exact or direct == "exact":
        own = probe_losses(sim, half, probe) - probe_losses(sim, theta, probe)
    else:
        v = jax.tree.map(jnp.subtract, half, theta)
        if order == 1:
            own = tree_dot(probe_grads(sim, theta, probe), v)
        else:
            own = slope_and_curvature(sim, theta, v, probe, lead=1, sign=1)
    return q[sources] * own


# --------------------------------------------------------------------------------------------
# dense cascades
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops", "batch_size", "unroll"))
def compute_gt_cascade(loss_fn, traj, probe, t, q, sources, *, hops, batch_size, unroll=True):
    """The unvalidated core of :func:`gt_cascade`, dense form (``t`` may be traced)."""
    n = q.shape[0]
    dtype = float_dtype(traj)
    sim = rerun_simulator(loss_fn, traj)
    drop = jnp.ones((sources.shape[0], n), dtype).at[jnp.arange(sources.shape[0]), sources].set(0)
    alphas = jnp.concatenate([jnp.ones((1, n), dtype), drop])

    def losses(alpha):  # [r, n]
        return probe_losses(sim, probe_vars(rerun(loss_fn, traj, t, hops, alpha)), probe, lead=2)

    L = map_sources(losses, alphas, batch_size, unroll)  # [m+1 (actual, then source j), r, k]
    diff = jnp.transpose(L[0][None] - L[1:], (1, 2, 0))  # [r, k, j]
    direct = _direct(sim, traj, probe, t, q, sources, order=1, direct="exact", exact=True)
    mask = shells(traj.matrices_from(t, hops))[:, :, sources]
    return Cascade(direct, q[None, :, None] * diff, mask, sources)


@functools.partial(jax.jit, static_argnames=("loss_fn", "hops", "order", "direct", "batch_size",
                                             "unroll"))
def compute_e_cascade(loss_fn, traj, probe, t, q, sources, *, hops, order, direct, batch_size,
                      unroll=True):
    """The unvalidated core of :func:`e_cascade`, dense form (``t`` may be traced)."""
    n = q.shape[0]
    dtype = float_dtype(traj)
    sim = rerun_simulator(loss_fn, traj)
    ones = jnp.ones((n,), dtype)
    units = jnp.zeros((sources.shape[0], n), dtype).at[jnp.arange(sources.shape[0]),
                                                        sources].set(1)
    # one linearisation of the r-step re-run in the gates; its linear map is applied to the
    # m unit gates (vmap), giving every source's perturbation δ [r, n, ...]
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

    response = map_sources(response_of, units, batch_size, unroll)  # [j, r, k]
    matrix = q[None, :, None] * jnp.transpose(response, (1, 2, 0))
    own = _direct(sim, traj, probe, t, q, sources, order=order, direct=direct, exact=False)
    return Cascade(own, matrix, shells(traj.matrices_from(t, hops))[:, :, sources], sources)


# --------------------------------------------------------------------------------------------
# reach-restricted cascades
# --------------------------------------------------------------------------------------------


def _reach_values(tables, values, q, n):
    """``q_k`` times the per-hop values, zero at padded positions; and the shell masks."""
    out, shell = [], []
    for s in range(1, len(tables.nodes)):
        nodes = tables.nodes[s]
        valid = nodes < n
        weight = jnp.where(valid, jnp.take(q, nodes, mode="clip"), 0)
        out.append(weight * jnp.where(valid, values[s - 1], 0))
        shell.append(valid & (tables.prev_pos[s - 1] == tables.nodes[s - 1].shape[1]))
    return tuple(out), tuple(shell)


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "unroll"))
def compute_gt_reach(loss_fn, traj, probe, t, q, tables, nbr_idx, nbr_w, *, batch_size,
                     unroll=True):
    """The unvalidated core of :func:`gt_cascade`, reach-restricted (``t`` may be traced).

    Per source, only the counterfactual is re-run (on its reach); the actual probe losses
    are those of the recorded states, once per (hop, node). (Re-running the actual states on
    the reach as well changes nothing beyond rounding — measured on a float32 ring, the same
    largest deviation from the dense cascade, 7e-9 — at up to twice the cost.)
    """
    n = q.shape[0]
    sim = rerun_simulator(loss_fn, traj)
    dtype = float_dtype(traj)
    hops = len(tables.nodes) - 1
    recorded = [probe_losses(sim, probe_vars(traj.state_at(t + s)), probe)
                for s in range(1, hops + 1)]

    def one(rows):
        nodes, src_pos, prev_pos = rows
        states = reach_lib.restricted_states(sim, traj, t, nodes, src_pos, prev_pos, nbr_idx,
                                             nbr_w, jnp.zeros((), dtype))
        return [jnp.take(rec, nodes[s + 1], mode="clip")
                - probe_losses(sim, probe_vars(st), probe)
                for s, (rec, st) in enumerate(zip(recorded, states, strict=True))]

    values = map_sources(one, tuple(tables), batch_size, unroll)
    sources = tables.nodes[0][:, 0]
    out, shell = _reach_values(tables, values, q, n)
    direct = _direct(sim, traj, probe, t, q, sources, order=1, direct="exact", exact=True)
    return SparseCascade(direct, tuple(tables.nodes[1:]), out, shell, sources, n)


@functools.partial(jax.jit, static_argnames=("loss_fn", "order", "direct", "batch_size",
                                             "unroll", "adjoint", "flat"))
def compute_e_reach(loss_fn, traj, probe, t, q, tables, nbr_idx, nbr_w, *, order, direct,
                    batch_size, unroll=True, adjoint=False, flat=False):
    """The unvalidated core of :func:`e_cascade`, reach-restricted (``t`` may be traced).

    ``adjoint`` (order 1, ``r >= 2``, no model state): the last hop from the edges'
    pull-backs (:func:`~dicejax.influence.reach.edge_cotangents`, shared by the sources)
    instead of each source's tangent through the update of step ``t + r − 1``. ``flat``
    (order 1, ``r <= 3``, no model state): every source at once from products of shared
    pieces (:func:`~dicejax.influence.reach.flat_values`; ``batch_size`` is not used).
    """
    n = q.shape[0]
    sim = rerun_simulator(loss_fn, traj)
    dtype = float_dtype(traj)
    hops = len(tables.nodes) - 1
    recorded = [probe_vars(traj.state_at(t + s)) for s in range(1, hops + 1)]
    if order == 1:  # the probe gradients once per (hop, node), at the recorded states
        g = [probe_grads(sim, v, probe) for v in recorded]
    cot = None
    if adjoint or (flat and hops >= 2):
        cot = reach_lib.edge_cotangents(sim, traj, t + hops - 1, nbr_idx, nbr_w[hops - 1],
                                        g[hops - 1][0])
    sources = tables.nodes[0][:, 0]
    own = _direct(sim, traj, probe, t, q, sources, order=order, direct=direct, exact=False)
    if flat:
        values = reach_lib.flat_values(sim, traj, t, tables, nbr_idx, nbr_w, g, cot)
        out, shell = _reach_values(tables, values, q, n)
        return SparseCascade(own, tuple(tables.nodes[1:]), out, shell, sources, n)
    forward = hops - 1 if adjoint else hops  # hops carried by each source's tangent

    def one(rows):
        nodes, src_pos, prev_pos = rows

        def states(alpha):
            return reach_lib.restricted_states(
                sim, traj, t, nodes[:forward + 1], src_pos[:forward], prev_pos[:forward],
                nbr_idx, nbr_w, alpha)

        primal, tangent = jax.jvp(states, (jnp.ones((), dtype),), (jnp.ones((), dtype),))
        out = []
        for s in range(forward):
            if order == 1:
                gs = jax.tree.map(lambda x, s=s: jnp.take(x, nodes[s + 1], axis=0, mode="clip"),
                                  g[s])
                out.append(tree_dot(gs, probe_vars(tangent[s])))
            else:
                out.append(slope_and_curvature(sim, probe_vars(primal[s]),
                                               probe_vars(tangent[s]), probe, lead=1, sign=-1))
        if adjoint:
            out.append(reach_lib.last_hop(cot, tangent[-1], nodes[hops], src_pos[hops - 1]))
        return out

    values = map_sources(one, tuple(tables), batch_size, unroll)
    out, shell = _reach_values(tables, values, q, n)
    return SparseCascade(own, tuple(tables.nodes[1:]), out, shell, sources, n)


# --------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------


#: On CPU the default chunk of sources is also capped at about this many bytes: XLA:CPU runs
#: the batched tangents of a few sources at a time faster than of many (measured, 16-node
#: exponential graph, digits MLP, r = 3: 2 sources per chunk 145 ms, all 16 at once
#: 217-285 ms; at 1,024 ring nodes chunks of 4 to 1,024 sources all took 3.3-4.6 s).
CPU_CHUNK_BYTES = 64 * 2**20


def check_sources(sources: Any, n: int) -> np.ndarray:
    """Validates source indices (default every node); returns ``[m]`` int32."""
    if sources is None:
        return np.arange(n, dtype=np.int32)
    try:
        arr = np.asarray(sources)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sources: must be an array of node indices, got {sources!r}") from e
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sources: must be a non-empty 1-D array of integer node indices, "
                         f"got {arr.dtype} of shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"sources: node indices must lie in [0, {n}), got min {arr.min()} "
                         f"and max {arr.max()}")
    return arr.astype(np.int32)


class Plan(NamedTuple):
    """How a per-source query runs (see :func:`plan_cascade`).

    Attributes:
      mode: ``"dense"`` or ``"reach"``.
      sources: ``[m]`` int32 source nodes.
      batch_size: sources per chunk (with a budget, the first guess
        :func:`dicejax.influence.budget.run_chunked` checks).
      bytes_per_source: the estimate (:func:`dicejax.influence.budget.source_bytes`).
      tables: the :class:`~dicejax.influence.reach.ReachTables` (``"reach"``), else None.
      neighbours: the run's :class:`~dicejax.influence.reach.NeighbourList` (``"reach"``).
      unroll: chunks unrolled (convolutions on CPU) rather than looped.
      budget: the memory budget in bytes the chunk must fit (None when ``batch_size`` was
        given: then ``batch_size`` is the chunk).
      adjoint: the reach-restricted first-order cascade takes its last hop from the edges'
        pull-backs (:func:`use_adjoint_last_hop`).
      flat: every source at once from shared products, no tangent per source
        (:func:`use_flat_cascade`; then ``batch_size`` is all the sources).
    """

    mode: str
    sources: np.ndarray
    batch_size: int
    bytes_per_source: int
    tables: reach_lib.ReachTables | None
    neighbours: reach_lib.NeighbourList | None
    unroll: bool
    budget: int | None = None
    adjoint: bool = False
    flat: bool = False


def use_adjoint_last_hop(sizes: tuple[int, ...], sources: int, degree: int, n: int,
                         edge_bytes: int, budget: int) -> bool:
    """Whether a reach-restricted first-order cascade should take its last hop from the
    ``n·D`` edge pull-backs (:func:`~dicejax.influence.reach.edge_cotangents`).

    Per source, the forward last hop costs a Jacobian-vector product at each of the
    ``M_{r-1}`` nodes reached before it; the pull-backs cost ``n·D`` vector-Jacobian
    products in all (about the same each) and hold ``n·D`` parameter-and-optimizer-state
    cotangents. So: when ``m · M_{r-1} > n·D`` and those cotangents take at most a quarter
    of the budget. (16-node exponential graph, digits MLP, r = 3, all sources: 16 · 11 = 176
    tangent updates replaced by 80 pull-backs.)
    """
    return len(sizes) >= 3 and sources * sizes[-2] > n * degree \
        and n * degree * edge_bytes <= budget // 4


def flat_bytes(sizes: tuple[int, ...], sources: int, degree: int, n: int,
               nb: budget_lib.NodeBytes) -> int:
    """Estimated peak bytes of :func:`~dicejax.influence.reach.flat_values` with its probe
    gradients and edge pull-backs (all sources at once): per Jacobian-vector product of
    step ``t + 1`` (``m · M_1`` of them at ``r = 3``) and per edge pull-back (``n · D``,
    ``r ≥ 2``) its inputs, outputs and residuals; the ``r · n`` probe gradients."""
    edge = nb.params + nb.opt_state
    hops = len(sizes) - 1
    pushes = sources * sizes[1] if hops == 3 else 0
    pulls = n * degree if hops >= 2 else 0
    per = 4 * edge + 2 * nb.activations
    return ((pushes + pulls + sources) * per + hops * n * (nb.params + nb.probe)
            + sources * degree * sizes[1] * n * 8)


def use_flat_cascade(sizes: tuple[int, ...], n: int, nbytes: int, budget: int) -> bool:
    """Whether a reach-restricted first-order cascade (no model state) should run flat
    (:func:`~dicejax.influence.reach.flat_values`).

    Flat, the parameter-sized work is the same Jacobian-vector products as the per-source
    form (without its gathers and padding) plus inner products against all ``n`` nodes:
    per source ``n·D·M_1`` (``r = 3``), ``n·D`` (``r = 2``) or ``n`` (``r = 1``) of them,
    where the per-source form's last hop costs ``M_r·D·M_{r-1}`` (``M_1`` at ``r = 1``)
    with gathered rows, which XLA:CPU runs about 4x slower. So: ``r ≤ 3`` and
    ``n · M_1 ≤ 4 · M_3 · M_2`` (``r = 3``), ``n ≤ 4 · M_2 · M_1`` (``r = 2``),
    ``n ≤ 4 · M_1`` (``r = 1``), and the estimate :func:`flat_bytes` within a quarter of
    the budget. (16-node exponential graph, r = 3: 80 ≤ 704; 1,024-node ring: 3,072 > 140.)
    """
    hops = len(sizes) - 1
    if not 1 <= hops <= 3 or nbytes > budget // 4:
        return False
    if hops == 3:
        return n * sizes[1] <= 4 * sizes[3] * sizes[2]
    if hops == 2:
        return n <= 4 * sizes[2] * sizes[1]
    return n <= 4 * sizes[1]


def plan_cascade(loss_fn: LossFn, traj: Trajectory, probe: PyTree, step: int, hops: int, *,
                 kind: str, order: int = 1, sources: Any = None, mode: Mode = "auto",
                 batch_size: int | None = None, memory_budget: Any = None,
                 allow_flat: bool = True) -> Plan:
    """Chooses the cascade's form and its chunks: reach tables, bytes per source, budget.

    Args:
      loss_fn, traj, probe, step, hops: the query (validated by the caller).
      kind: ``"gt"`` or ``"e"``; order: the DICE-E order.
      sources: source nodes (default all).
      mode: ``"auto"``, ``"dense"`` or ``"reach"``.
      batch_size: sources per chunk (default: from ``memory_budget``).
      memory_budget: bytes (default :func:`dicejax.influence.budget.default_budget`).
      allow_flat: whether the flat form may be chosen (:func:`use_flat_cascade`).

    Returns:
      A :class:`Plan`.
    """
    n = traj.num_nodes
    src = check_sources(sources, n)
    if mode not in ("auto", "dense", "reach"):
        raise ValueError(f"mode: must be 'auto', 'dense' or 'reach', got {mode!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, int | np.integer) or batch_size < 1):
        raise ValueError(f"batch_size: must be None or a positive integer, got {batch_size!r}")
    budget = budget_lib.check_budget(memory_budget) if batch_size is None else None
    tables = nbrs = None
    if mode != "dense" and isinstance(traj.mixer, Mixer):
        nbrs = reach_lib.neighbour_list(traj.mixer)
        tables = reach_lib.reach_tables(nbrs, reach_lib.step_phases(traj, step, hops), src)
        if mode == "auto" and not reach_lib.reach_is_cheaper(tables.sizes, n, kind):
            tables = nbrs = None
    elif mode == "reach":
        raise ValueError("mode: 'reach' needs the run's neighbour lists (a Mixer)")
    chosen = "dense" if tables is None else "reach"
    sim = rerun_simulator(loss_fn, traj)
    sizes = tables.sizes if tables is not None else (n,) * (hops + 1)
    degree = 1 if nbrs is None else int(nbrs.indices.shape[1])
    nb = _node_bytes(sim.loss_fn, sim.has_aux, sim.stateful, sim.rng,
                     shape_key(traj.node_struct()), shape_key(traj.batch_struct()),
                     shape_key(probe))
    first_order = tables is not None and kind == "e" and order == 1 and not sim.stateful
    room = budget_lib.default_budget() if budget is None else budget
    whole = flat_bytes(sizes, len(src), degree, n, nb)
    flat = (allow_flat and first_order and batch_size is None
            and use_flat_cascade(sizes, n, whole, room))
    adjoint = first_order and not flat and use_adjoint_last_hop(
        sizes, len(src), degree, n, nb.params + nb.opt_state, room)
    if flat:  # one program for every source: no chunks
        return Plan(chosen, src, len(src), -(-whole // len(src)), tables, nbrs,
                    _has_conv_on_cpu(sim, traj), budget, False, True)
    if adjoint:  # tangents over r - 1 hops, then the last hop's rows of edge cotangents
        per = (budget_lib.source_bytes(nb, sizes[:-1], kind=kind, order=order, degree=degree)
               + sizes[-1] * degree * (nb.params + nb.opt_state))
    else:
        per = budget_lib.source_bytes(nb, sizes, kind=kind, order=order, degree=degree)
    if batch_size is None:  # a first guess: budget.run_chunked checks it against XLA's count
        largest = max(1, min(len(src), budget // max(per, 1)))
        if jax.default_backend() == "cpu":
            largest = min(largest, max(1, CPU_CHUNK_BYTES // max(per, 1)))
        batch_size = balanced_chunk(len(src), largest)
    return Plan(chosen, src, int(batch_size), per, tables, nbrs, _has_conv_on_cpu(sim, traj),
                budget, adjoint)


def chunk_program(loss_fn: LossFn, traj: Trajectory, probe: PyTree, step: int, hops: int,
                  q: jax.Array, plan: Plan, *, kind: str, order: int = 1,
                  direct: str = "taylor") -> tuple[Any, tuple, dict]:
    """The jitted chunked program of a planned query: ``(fn, args, static)``, to run as
    ``fn(*args, batch_size=k, **static)`` (or to lower for XLA's memory count).

    Args:
      loss_fn, traj, probe, step, hops: the validated query; q: ``[n]`` node weights.
      plan: its :class:`Plan`; kind: ``"gt"`` or ``"e"``; order, direct: DICE-E's options.
    """
    t = jnp.asarray(step)
    if plan.mode == "reach":
        args = (loss_fn, traj, probe, t, q, plan.tables.device(),
                jnp.asarray(plan.neighbours.indices),
                reach_lib.weights_at(traj, plan.neighbours, step, hops))
        if kind == "gt":
            return compute_gt_reach, args, dict(unroll=plan.unroll)
        return compute_e_reach, args, dict(order=order, direct=direct, unroll=plan.unroll,
                                           adjoint=plan.adjoint, flat=plan.flat)
    args = (loss_fn, traj, probe, t, q, jnp.asarray(plan.sources))
    if kind == "gt":
        return compute_gt_cascade, args, dict(hops=hops, unroll=plan.unroll)
    return compute_e_cascade, args, dict(hops=hops, order=order, direct=direct,
                                         unroll=plan.unroll)


@functools.lru_cache(maxsize=64)
def _conv_on_cpu(loss, has_aux, stateful, rng, state_shapes, batch_shapes) -> bool:
    if jax.default_backend() != "cpu":
        return False
    shell = Simulator(None, loss, has_aux=has_aux, stateful=stateful, rng=rng)
    one, batch = shape_structs(state_shapes), shape_structs(batch_shapes)
    jaxpr = jax.make_jaxpr(scalar_loss(shell))(one.params, one.model_state, batch, one.key)
    return has_primitive(jaxpr, "conv_general_dilated")


def _has_conv_on_cpu(sim, traj) -> bool:
    """Whether the loss has a convolution and runs on CPU (chunks unrolled); cached per loss
    and shapes, so that repeated queries do not trace the loss again."""
    return _conv_on_cpu(sim.loss_fn, sim.has_aux, sim.stateful, sim.rng,
                        shape_key(traj.node_struct()), shape_key(traj.batch_struct()))


@functools.lru_cache(maxsize=64)
def _node_bytes(loss, has_aux, stateful, rng, state_shapes, batch_shapes, probe_shapes):
    shell = Simulator(None, loss, has_aux=has_aux, stateful=stateful, rng=rng)
    one, batch, probe = map(shape_structs, (state_shapes, batch_shapes, probe_shapes))
    return budget_lib.node_bytes(shell, one, batch, probe)


def gt_cascade(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    *,
    sources: Any = None,
    mode: Mode = "auto",
    batch_size: int | None = None,
    memory_budget: float | None = None,
) -> Cascade | SparseCascade:
    """Exact DICE-GT cascade: counterfactual re-runs with each source's update removed.

    Removing ``z_j^t``: node ``j`` gossips ``θ_j^t`` instead of ``θ_j^{t+½}`` at step ``t`` and
    keeps its optimizer state; steps ``t+1 .. t+r-1`` are re-run with everything else fixed.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` for one node (training and probe loss,
        in the form the run was made with).
      traj: a recorded trajectory (``record=True``).
      probe: the probe batch ``z'`` shared by all nodes.
      step: local step index ``t`` (``0 <= t``, ``t + hops <= T``).
      hops: ``r >= 1``.
      node_weights: ``q`` ``[n]`` (default uniform ``1/n``).
      sources: the source nodes ``[m]`` to score (default every node).
      mode: ``"auto"`` (reach-restricted unless it would update more nodes than the dense
        form, :func:`~dicejax.influence.reach.reach_is_cheaper`), ``"dense"`` or ``"reach"``.
      batch_size: sources per chunk (default: as many as ``memory_budget`` allows).
      memory_budget: bytes the chunks may use (default half the free memory).

    Returns:
      A :class:`Cascade` (dense) or :class:`SparseCascade`; ``.total`` ``[m]`` is
      DICE-GT^(r), ``.network(h)`` the network-level reading.

    Raises:
      ValueError: for bad arguments, or when even one source does not fit the budget.
    """
    q = check_query(traj, probe, step, hops, node_weights, loss_fn,
                    reruns=True).astype(float_dtype(traj))
    plan = plan_cascade(loss_fn, traj, probe, step, hops, kind="gt", sources=sources, mode=mode,
                        batch_size=batch_size, memory_budget=memory_budget)
    return budget_lib.run_chunked(
        *chunk_program(loss_fn, traj, probe, step, hops, q, plan, kind="gt"),
        chunk=plan.batch_size, num=len(plan.sources), budget=plan.budget, what="DICE-GT")


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
    sources: Any = None,
    mode: Mode = "auto",
    batch_size: int | None = None,
    memory_budget: float | None = None,
) -> Cascade | SparseCascade:
    """DICE-E cascade: first-order responses ``g_k^{t+s} · δ_k^{t+s}(j)`` of every source.

    ``δ`` starts as ``W^t[:, j] v_j`` and follows the JVP of the true step (for SGD,
    ``δ ← W (δ − η H δ)`` with each node's own training Hessian), so any optax optimizer works.

    Args:
      loss_fn, traj, probe, step, hops, node_weights, sources, mode, batch_size,
        memory_budget: as in :func:`gt_cascade`.
      order: 1 (the paper's estimator) or 2, which adds the probe-loss curvature terms
        ``½ vᵀH'v`` to the direct term and ``−½ δᵀH'δ`` at each observer (each a jvp of a jvp
        of the probe loss: forward mode, no HVP).
      direct: ``"taylor"`` (``g_j^t · v_j``, the paper's form) or ``"exact"``
        (``L(θ_j^{t+½}) − L(θ_j^t)``, two forward passes at the source).

    Returns:
      A :class:`Cascade` or :class:`SparseCascade`; ``.total`` ``[m]`` is DICE-E^(r).
    """
    q = check_query(traj, probe, step, hops, node_weights, loss_fn).astype(float_dtype(traj))
    if order not in (1, 2):
        raise ValueError(f"order: must be 1 or 2, got {order!r}")
    if direct not in ("taylor", "exact"):
        raise ValueError(f"direct: must be 'taylor' or 'exact', got {direct!r}")
    options = dict(kind="e", order=order, sources=sources, mode=mode, batch_size=batch_size,
                   memory_budget=memory_budget)
    plan = plan_cascade(loss_fn, traj, probe, step, hops, **options)

    def run(plan):
        return budget_lib.run_chunked(
            *chunk_program(loss_fn, traj, probe, step, hops, q, plan, kind="e", order=order,
                           direct=direct),
            chunk=plan.batch_size, num=len(plan.sources), budget=plan.budget, what="DICE-E")

    if not plan.flat:
        return run(plan)
    try:
        return run(plan)
    except ValueError:  # the flat program (all sources at once) exceeds the budget: chunks
        return run(plan_cascade(loss_fn, traj, probe, step, hops, allow_flat=False, **options))


def dice_gt(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    **options: Any,
) -> jax.Array:
    """DICE-GT^(r)(j, t) of every source node ``j``: ``[m]`` (negative = helpful).

    See :func:`gt_cascade` for the arguments (``sources``, ``mode``, ``batch_size``,
    ``memory_budget``).
    """
    return gt_cascade(loss_fn, traj, probe, step, hops, node_weights, **options).total


def dice_e(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int = 1,
    node_weights: jax.Array | None = None,
    **options: Any,
) -> jax.Array:
    """DICE-E^(r)(j, t) of every source node ``j``: ``[m]`` (negative = helpful).

    See :func:`e_cascade` for the arguments (``order``, ``direct``, ``sources``, ``mode``,
    ``batch_size``, ``memory_budget``).
    """
    return e_cascade(loss_fn, traj, probe, step, hops, node_weights, **options).total


def dice_gt_network(
    loss_fn: LossFn,
    traj: Trajectory,
    probe: PyTree,
    step: int,
    hops: int | None = None,
    node_weights: jax.Array | None = None,
    *,
    horizon: int | None = None,
    **options: Any,
) -> jax.Array:
    """Exact network-level influence ``Σ_k q_k [L(θ_k^{t+h}) − L(θ̃_k^{t+h})]``: ``[m]``.

    Args:
      loss_fn, traj, probe, step, node_weights: as in :func:`gt_cascade`.
      hops: ``h >= 1``, the number of later steps (default 1); ``horizon=`` is its
        deprecated name.
      **options: ``sources``, ``mode``, ``batch_size``, ``memory_budget`` of
        :func:`gt_cascade`.
    """
    hops = _renamed_horizon(hops, horizon, 1)
    return gt_cascade(loss_fn, traj, probe, step, hops, node_weights, **options).network()


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
    sources: Any = None,
    horizon: int | None = None,
) -> jax.Array:
    """First-order network-level influence of every source, ``h`` steps later: ``[m]``.

    Computed by one adjoint sweep (reverse mode through the ``h``-step re-run):
    ``λ ← J_stepᵀ λ`` from ``λ^{t+h} = q ⊙ g^{t+h}``, then ``⟨λ_j, v_j⟩`` for every source.
    Equals ``e_cascade(..., hops=h).network()`` at a cost independent of ``n`` sources.

    Args:
      loss_fn, traj, probe, step, node_weights: as in :func:`e_cascade`.
      hops: ``h >= 1`` (default 1); ``horizon=`` is its deprecated name.
      sources: the source nodes ``[m]`` to report (all are computed: one sweep serves every
        source).
    """
    hops = _renamed_horizon(hops, horizon, 1)
    q = check_query(traj, probe, step, hops, node_weights, loss_fn)
    src = check_sources(sources, traj.num_nodes)
    out = compute_e_network(
        loss_fn, traj, probe, jnp.asarray(step), q.astype(float_dtype(traj)), hops=hops
    )
    return out if sources is None else out[src]
