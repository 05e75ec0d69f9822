"""Gossip kernels: one mixing step ``θ_k ← Σ_j W[k, j] θ_j`` applied to a stacked pytree.

Every leaf of the pytree carries the node axis first (``[n, ...]``). Two kernels compute the
same thing:

* :func:`gossip_dense` — one contraction with the dense matrix ``W`` ``[n, n]`` per leaf
  (``[n, n] × [n, P_leaf]``); cost ``O(n² P)`` for ``P`` parameters per node. Per leaf
  rather than on one concatenated ``[n, P]`` buffer: the concatenation and the split cost
  two extra passes over the parameters, and the per-leaf form ran the MLP's dense step
  16–19 % faster on a quiet machine (benchmarks/RESULTS.md §2). The form that gradients
  with respect to ``W`` are usually taken through.
* :func:`gossip_sparse` — a padded neighbour-list gather (jax-md's dense neighbour format:
  ``indices [n, D]`` padded with the out-of-range value ``n``) and a weighted sum over the
  ``D`` in-neighbours; cost ``O(n D P)``. Per leaf, unrolled over the ``D`` slots
  (``Σ_d w[:, d] · x[indices[:, d]]``), so XLA fuses the row gathers and the sum into one
  loop: no ``[n, D, P]`` gather buffer and no concatenation of leaves. The default whenever
  the padded degree is well below ``n`` (see :func:`choose_method`). The weights are
  gathered from ``W`` so gradients with respect to ``W`` flow here too.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import topology as topo_lib

PyTree = Any
Method = Literal["auto", "dense", "sparse"]

# "auto" picks the sparse kernel when the graph has at least this many nodes ...
SPARSE_MIN_NODES = 8
# ... and each node has at most this fraction of the nodes as in-neighbours (padded degree D,
# self included). Measured (benchmarks/RESULTS.md §2): with the one-buffer dense kernel
# (finding 3: gossip alone, a loaded machine) the gather kernel took 2.5 ms vs 9.6 ms dense
# at n = 16 (D = 5), 11.5 vs 47 at n = 64 (D = 7), 124 vs 377 at n = 256 (D = 9). Once the
# dense kernel multiplied leaf by leaf (2026-12-04, a quiet Intel Xeon VM, `simulate` of the
# MLP on exponential graphs, two runs each) dense beat the gather kernel by 6–19 % at n = 8,
# 26–32 % at n = 16 (D = 5), 12–33 % at n = 32 (D = 6) and 8–11 % at n = 64 (D = 7), matched
# it at n = 128 (D = 8) and lost 5 % at n = 256 (D = 9). Gossip alone
# (`benchmarks/bench_gossip.py`, ring / torus / exponential, n = 8 … 144, same VM): D <= n / 8
# picks the faster kernel in 18 of the 20 graphs, and in the other two it costs 1.13× (ring,
# n = 16) and 1.22× (exponential, n = 64, where runs disagree: 0.82–1.20); D <= n / 3 lost
# 1.25–1.5× on the torus at n = 16 and 36 and on exponential graphs of 16 to 36 nodes.
SPARSE_MAX_FILL = 1 / 8


def choose_method(n: int, max_in_degree: int, method: Method = "auto") -> str:
    """Picks the gossip kernel for a graph of ``n`` nodes with padded degree ``max_in_degree``.

    Args:
      n: number of nodes.
      max_in_degree: ``D``, the width of the padded neighbour list (self included).
      method: ``"dense"`` or ``"sparse"`` force a kernel; ``"auto"`` picks sparse for graphs
        with ``n >= SPARSE_MIN_NODES`` (8) nodes and ``D <= SPARSE_MAX_FILL · n`` (``n / 8``).

    Returns:
      ``"dense"`` or ``"sparse"``.
    """
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"mixing: method must be 'auto', 'dense' or 'sparse', got {method!r}")
    if method != "auto":
        return method
    if n >= SPARSE_MIN_NODES and max_in_degree <= SPARSE_MAX_FILL * n:
        return "sparse"
    return "dense"


def flat_apply(fn, tree: PyTree) -> PyTree:
    """Applies ``fn([n, P] buffer) -> [n, P]`` to all leaves, one buffer per dtype.

    The leaves of one dtype are flattened to ``[n, P_leaf]`` and concatenated, so a
    row-mixing ``fn`` (a matrix product, a sharded kernel) runs once per dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    n = leaves[0].shape[0]
    out: list[Any] = [None] * len(leaves)
    by_dtype: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(jnp.result_type(leaf), []).append(i)
    for idx in by_dtype.values():
        flat = [leaves[i].reshape(n, -1) for i in idx]
        sizes = np.cumsum([f.shape[1] for f in flat])[:-1]
        buf = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)
        mixed = fn(buf)
        parts = [mixed] if len(flat) == 1 else jnp.split(mixed, sizes, axis=1)
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, out)


def gossip_dense(matrix: jax.Array, tree: PyTree) -> PyTree:
    """Mixes a stacked pytree with a dense matrix.

    Args:
      matrix: ``W`` ``[n, n]``; row ``k`` holds the weights node ``k`` receives.
      tree: pytree, every leaf ``[n, ...]``.

    Returns:
      The pytree with leaf ``x`` replaced by ``einsum('kj,j...->k...', W, x)`` (``W`` cast
      to the leaf's dtype), one matrix product per leaf.
    """

    def mix(x):
        flat = x.reshape(x.shape[0], -1)
        out = jnp.matmul(matrix.astype(x.dtype), flat, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(x.shape)

    return jax.tree.map(mix, tree)


def gossip_sparse(indices: jax.Array, weights: jax.Array, tree: PyTree) -> PyTree:
    """Mixes a stacked pytree through a padded neighbour list.

    Args:
      indices: ``[n, D]`` int, in-neighbours of each node, padded with the value ``n``.
      weights: ``[n, D]``, ``W[k, indices[k, d]]`` (zero at padded slots).
      tree: pytree, every leaf ``[n, ...]``.

    Returns:
      The pytree with leaf ``x`` replaced by ``Σ_d weights[k, d] x[indices[k, d]]``
      (weights cast to the leaf's dtype; padded slots gather zeros).
    """
    num_slots = indices.shape[1]

    def mix(x):
        bcast = (-1,) + (1,) * (x.ndim - 1)
        w = weights.astype(x.dtype)
        out = None
        for d in range(num_slots):  # D is static: one fused gather-and-sum loop per leaf
            row = jnp.take(x, indices[:, d], axis=0, mode="fill", fill_value=0)
            term = w[:, d].reshape(bcast) * row
            out = term if out is None else out + term
        return out

    return jax.tree.map(mix, tree)


class Mixer(NamedTuple):
    """The gossip operator of a whole run, as a pytree that can enter ``jit`` and ``scan``.

    Attributes:
      matrices: ``[P, n, n]`` per-step mixing matrices; step ``t`` uses ``matrices[t % P]``
        (``P = 1`` for a static graph).
      indices: ``[n, D]`` int32 padded in-neighbour list (sparse kernel), or ``None`` (dense).
      weights: ``[P, n, D]`` neighbour weights gathered from ``matrices``, or ``None``.
    """

    matrices: jax.Array
    indices: jax.Array | None = None
    weights: jax.Array | None = None

    @property
    def period(self) -> int:
        return self.matrices.shape[0]

    @property
    def method(self) -> str:
        return "dense" if self.indices is None else "sparse"

    def matrix_at(self, t) -> jax.Array:
        """``W^t`` ``[n, n]`` (``t`` may be traced)."""
        return self.matrices[0] if self.period == 1 else self.matrices[t % self.period]

    def weights_at(self, t) -> jax.Array:
        """``[n, D]`` neighbour weights of step ``t`` (sparse mixers)."""
        return self.weights[0] if self.period == 1 else self.weights[t % self.period]

    def apply(self, t, tree: PyTree, finite: jax.Array | None = None) -> PyTree:
        """Gossip of the stacked pytree ``tree`` (leaves ``[n, ...]``) at step ``t``.

        Args:
          t: the global step (may be traced).
          tree: pytree, leaves ``[n, ...]``.
          finite: optional ``[n]`` bool, which nodes' values are finite: then a zero weight
            never carries a non-finite value (see :func:`isolate`). None: the plain product,
            where ``0 · NaN = NaN`` reaches every row.
        """
        if finite is not None:
            return isolate(self, t, tree, finite)
        if self.indices is None:
            return gossip_dense(self.matrix_at(t), tree)
        return gossip_sparse(self.indices, self.weights_at(t), tree)

    def listens_to(self, t, nodes: jax.Array) -> jax.Array:
        """``[n]`` bool: node ``k`` gives a non-zero weight at step ``t`` to some node
        flagged in ``nodes`` ``[n]`` bool."""
        if self.indices is None:
            return jnp.any((self.matrix_at(t) != 0) & nodes[None, :], axis=1)
        flagged = jnp.concatenate([nodes, jnp.zeros((1,), bool)])  # padded slots: index n
        return jnp.any((self.weights_at(t) != 0) & flagged[self.indices], axis=1)


def isolate(mixer: Mixer, t, tree: PyTree, finite: jax.Array) -> PyTree:
    """Gossip in which a zero weight never carries a non-finite value.

    Rows of non-finite nodes enter the product as zeros, so ``θ_k ← Σ_j W[k, j] θ_j`` over
    the finite senders is exactly what the plain kernel computes for a node that gives every
    non-finite node weight 0; a node that gives one a non-zero weight (or is non-finite
    itself) receives NaN in every float leaf: it diverges with its sender, and nobody else
    does.

    Args:
      mixer: the gossip operator.
      t: the global step.
      tree: pytree, leaves ``[n, ...]``.
      finite: ``[n]`` bool, which nodes' values are finite.

    Returns:
      The mixed pytree.
    """
    def mask(x, rows, value):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.asarray(value, x.dtype),
                         x)

    out = mixer.apply(t, jax.tree.map(lambda x: mask(x, ~finite, 0), tree))
    tainted = mixer.listens_to(t, ~finite) | ~finite
    return jax.tree.map(lambda y: mask(y, tainted, jnp.nan), out)


def make_mixer(matrices: jax.Array, indices: np.ndarray | None = None) -> Mixer:
    """Builds a :class:`Mixer` from per-step matrices and an optional neighbour list.

    Args:
      matrices: ``[P, n, n]`` (may be a tracer: gradients flow through both kernels).
      indices: ``[n, D]`` padded in-neighbour indices (union support over the period), or
        ``None`` for the dense kernel.

    Returns:
      The mixer.
    """
    matrices = jnp.asarray(matrices)
    if indices is None:
        return Mixer(matrices)
    n = matrices.shape[-1]
    idx = np.asarray(indices)
    safe = jnp.asarray(np.minimum(idx, n - 1))
    mask = jnp.asarray(idx < n)
    w = jnp.take_along_axis(matrices, jnp.broadcast_to(safe, matrices.shape[:1] + safe.shape), -1)
    w = jnp.where(mask, w, jnp.zeros((), w.dtype))
    return Mixer(matrices, jnp.asarray(idx, jnp.int32), w)


def from_topology(topo: Any, method: Method = "auto", num_nodes: int | None = None) -> Mixer:
    """The gossip operator of a topology or a mixing matrix.

    Args:
      topo: a :class:`~dicejax.topology.Topology` (static or periodic), an ``[n, n]`` matrix
        (static) or ``[T, n, n]`` (one matrix per step; step ``t`` uses ``matrices[t % T]``).
        Row ``k`` holds the weights node ``k`` receives. A traced array (gradients with
        respect to ``W``) gets the dense kernel.
      method: ``"auto"`` (sparse when :func:`choose_method` says so), ``"dense"`` or
        ``"sparse"``.
      num_nodes: the ``n`` the caller expects (checked; default: the matrix's).

    Returns:
      A :class:`Mixer`.

    Raises:
      ValueError: for a matrix that is not square, has negative entries or rows that do not
        sum to 1, a node count other than ``num_nodes``, an unknown ``method``, or
        ``"sparse"`` with a traced matrix.
    """
    choose_method(1, 1, method)  # validates the name
    if not isinstance(topo, topo_lib.Topology):
        topo_lib.validate_mixing(topo, name="topo")
        if isinstance(topo, jax.core.Tracer):  # no concrete support to build lists from
            if method == "sparse":
                raise ValueError("mixing: 'sparse' needs a concrete matrix, got a traced array")
            if num_nodes is not None and topo.shape[-1] != num_nodes:
                raise ValueError(f"topo: matrix is for {topo.shape[-1]} nodes but params have "
                                 f"n={num_nodes} nodes")
            return make_mixer(topo[None] if topo.ndim == 2 else topo)
        topo = topo_lib.Topology(np.asarray(topo))
    if num_nodes is not None and topo.n != num_nodes:
        raise ValueError(f"topo: matrix is for {topo.n} nodes but params have n={num_nodes} "
                         "nodes")
    matrices = jnp.asarray(topo.stacked())
    indices = topo.neighbors.indices
    if choose_method(topo.n, indices.shape[1], method) == "dense":
        return make_mixer(matrices)
    return make_mixer(matrices, indices)
