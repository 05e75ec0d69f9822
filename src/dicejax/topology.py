"""Communication topologies: mixing matrices, their builders, properties and schedules.

Convention (used everywhere in dicejax): a mixing matrix ``W`` has shape ``[n, n]`` and
**row k holds the weights node k receives**: ``W[k, j] > 0`` means node j sends to node k,
and the gossip step is ``θ_k ← Σ_j W[k, j] θ_j``. ``W`` must be row-stochastic (non-negative,
every row sums to 1); it need not be symmetric or doubly stochastic.

A time-varying topology is a periodic schedule, a stack ``[P, n, n]``; step ``t`` uses
``matrix[t % P]``. A random schedule of ``T`` steps is simply a stack with ``P = T``.

Everything here is plain numpy on the host (builders and graph properties are set-up code),
except :meth:`NeighborList.weights`, which also accepts jax arrays and tracers so that
gradients with respect to ``W`` flow through the padded neighbour-list gather.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import inspect
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "NeighborList",
    "Topology",
    "by_name",
    "complete",
    "designed16",
    "erdos_renyi",
    "exponential",
    "from_adjacency",
    "from_matrix",
    "from_networkx",
    "grid",
    "hypercube",
    "load_csv",
    "one_peer_exponential",
    "random_matching",
    "random_regular",
    "ring",
    "save_csv",
    "star",
    "to_networkx",
    "torus",
    "validate_mixing",
]

DESIGNED16_ENV = "DICEJAX_DESIGNED16"
"""Environment variable :func:`designed16` reads when no path is given (overrides the
bundled copy)."""

DESIGNED16_FILE = "dice_designed16.csv"
"""File name of the bundled matrix, in the package's ``resources`` folder."""
_WEIGHT_SCHEMES = ("metropolis_hastings", "uniform")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_int(value: Any, arg: str, where: str, minimum: int = 0) -> int:
    """Returns ``value`` as an ``int`` or raises ``ValueError`` naming ``where`` and ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{where}: {arg} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {arg} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed: Any, where: str) -> int:
    return _check_int(seed, "seed", where, minimum=0)


def _fmt_index(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def validate_mixing(matrix: Any, name: str = "topology", atol: float = 1e-6) -> None:
    """Checks that ``matrix`` is a valid (row-stochastic) mixing matrix or schedule.

    Shapes are always checked. Values (finite, non-negative, rows summing to 1 within
    ``atol``; ``max(atol, 1e-5)`` for float32 and ``max(atol, 1e-2)`` for 16-bit inputs) are
    checked only for concrete arrays: a jax ``Tracer`` (inside ``jit``/``grad``) gets the shape
    checks only.

    Args:
      matrix: ``[n, n]`` mixing matrix, or ``[P, n, n]`` schedule (step t uses
        ``matrix[t % P]``); numpy array, jax array, tracer or nested lists.
      name: what to call the matrix in error messages.
      atol: absolute tolerance on the row sums.

    Raises:
      ValueError: naming ``name`` and the problem (shape, non-finite or negative entry with
        its index, a row sum that is not 1).
    """
    if not isinstance(name, str):
        raise ValueError(f"validate_mixing: name must be a str, got {type(name).__name__}")
    if not (isinstance(atol, int | float | np.floating) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"{name}: atol must be a finite number >= 0, got {atol!r}")
    if isinstance(matrix, jax.core.Tracer):
        _check_mixing_shape(tuple(matrix.shape), name)
        return
    try:
        arr = np.asarray(matrix)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: matrix must be a numeric array, got {type(matrix)}") from err
    _check_mixing_shape(arr.shape, name)
    if arr.dtype.kind not in "biuf" and arr.dtype.name != "bfloat16":
        raise ValueError(f"{name}: matrix must be a real numeric array, got dtype {arr.dtype}")
    tol = float(atol)
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        if arr.dtype.itemsize == 4:
            tol = max(tol, 1e-5)
        elif arr.dtype.itemsize < 4:
            tol = max(tol, 1e-2)
    values = arr.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: matrix has non-finite entry {values[index]} at {_fmt_index(index)}"
        )
    negative = values < 0
    if negative.any():
        index = tuple(np.argwhere(negative)[0])
        raise ValueError(f"{name}: negative entry {values[index]:.10g} at {_fmt_index(index)}")
    row_sums = values.sum(axis=-1)
    off = np.abs(row_sums - 1.0) > tol
    if off.any():
        index = tuple(np.argwhere(off)[0])
        where = f"matrix[{index[0]}] row {index[1]}" if values.ndim == 3 else f"row {index[0]}"
        raise ValueError(
            f"{name}: {where} sums to {row_sums[index]:.10g}, rows must sum to 1 "
            f"(row-stochastic, atol={tol:g})"
        )


def _check_mixing_shape(shape: tuple[int, ...], name: str) -> None:
    if len(shape) not in (2, 3):
        raise ValueError(
            f"{name}: matrix must have 2 axes [n, n] or 3 axes [P, n, n], got shape {shape}"
        )
    if shape[-1] != shape[-2]:
        raise ValueError(f"{name}: matrix must be square, got shape {shape}")
    if shape[-1] < 1:
        raise ValueError(f"{name}: matrix must have at least one node, got shape {shape}")
    if len(shape) == 3 and shape[0] < 1:
        raise ValueError(f"{name}: schedule must have at least one step, got shape {shape}")


# --------------------------------------------------------------------------------------------
# Neighbour lists and the Topology container
# --------------------------------------------------------------------------------------------


class NeighborList(NamedTuple):
    """Padded (dense, jax-md style) in-neighbour lists.

    Row k lists the nodes j that node k receives from (``W[k, j] > 0``, node k itself
    included when ``W[k, k] > 0``), in increasing order, padded with the out-of-range index
    ``n``. ``D`` is the largest such list length.

    Attributes:
      indices: ``[n, D]`` int32 sender indices, padded with ``n``.
      mask: ``[n, D]`` bool, True where ``indices`` is a real neighbour.
    """

    indices: np.ndarray
    mask: np.ndarray

    def weights(self, matrix: Any) -> Any:
        """Gathers the edge weights ``W[k, indices[k, d]]`` (0 where masked).

        Works on numpy arrays (returns numpy) and on jax arrays or tracers (returns jax,
        differentiable with respect to ``matrix``; padded slots receive zero gradient).

        Args:
          matrix: ``[..., n, n]`` mixing matrix or stack of matrices, e.g. ``[n, n]`` or
            ``[P, n, n]``.

        Returns:
          ``[..., n, D]`` weights, ``out[..., k, d] = matrix[..., k, indices[k, d]]``.

        Raises:
          ValueError: if ``matrix``'s last two axes are not ``[n, n]``.
        """
        n = self.indices.shape[0]
        shape = tuple(getattr(matrix, "shape", np.shape(matrix)))
        if len(shape) < 2 or shape[-2:] != (n, n):
            raise ValueError(
                f"NeighborList.weights: matrix must have shape [..., {n}, {n}], got {shape}"
            )
        use_jax = any(isinstance(x, jax.Array) for x in (matrix, self.indices, self.mask))
        xp = jnp if use_jax else np
        matrix = xp.asarray(matrix)
        idx = xp.clip(xp.asarray(self.indices), 0, n - 1)
        idx = xp.broadcast_to(idx, shape[:-2] + idx.shape)
        gathered = xp.take_along_axis(matrix, idx, axis=-1)
        return xp.where(xp.asarray(self.mask), gathered, xp.zeros((), gathered.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
    """A communication graph: a row-stochastic mixing matrix or a periodic schedule of them.

    Attributes:
      matrix: ``[n, n]`` (static) or ``[P, n, n]`` (time-varying, step t uses
        ``matrix[t % P]``) float64, read-only. ``matrix[..., k, j]`` is the weight node k
        puts on node j's parameters (j sends to k); rows sum to 1.
      name: a descriptive name, e.g. ``"ring(16)"``.

    Derived quantities (cached properties) treat a time-varying topology through the
    union of its supports over one period unless stated otherwise.
    """

    matrix: np.ndarray
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"Topology: name must be a str, got {type(self.name).__name__}")
        validate_mixing(self.matrix, name=f"topology {self.name!r}")
        matrix = np.array(self.matrix, dtype=np.float64, copy=True)
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)

    def __repr__(self) -> str:
        kind = f", period={self.period}" if self.is_time_varying else ""
        return f"Topology(name={self.name!r}, n={self.n}{kind})"

    # -- shape -------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of nodes."""
        return int(self.matrix.shape[-1])

    @property
    def period(self) -> int:
        """Length ``P`` of the periodic schedule (1 for a static topology)."""
        return int(self.matrix.shape[0]) if self.matrix.ndim == 3 else 1

    @property
    def is_time_varying(self) -> bool:
        """True when ``matrix`` is a ``[P, n, n]`` schedule (even with ``P == 1``)."""
        return self.matrix.ndim == 3

    def at(self, t: int) -> np.ndarray:
        """The ``[n, n]`` mixing matrix used at step ``t >= 0`` (``matrix[t % P]``)."""
        t = _check_int(t, "t", "Topology.at")
        return self.matrix[t % self.period] if self.is_time_varying else self.matrix

    def schedule(self, steps: int) -> np.ndarray:
        """The per-step matrices ``[T, n, n]`` for ``T = steps`` steps (``t = 0..T-1``)."""
        steps = _check_int(steps, "steps", "Topology.schedule")
        return self.stacked()[np.arange(steps) % self.period]

    def stacked(self) -> np.ndarray:
        """The schedule as ``[P, n, n]`` (a static topology gives ``[1, n, n]``)."""
        return self.matrix if self.is_time_varying else self.matrix[None]

    # -- graph structure ---------------------------------------------------------------------

    @functools.cached_property
    def support(self) -> np.ndarray:
        """``[n, n]`` bool, ``W[k, j] > 0`` at some step of the period (self-loops included)."""
        support = (self.stacked() > 0).any(axis=0)
        support.setflags(write=False)
        return support

    @functools.cached_property
    def neighbors(self) -> NeighborList:
        """Padded in-neighbour lists (union of supports over the period, self included)."""
        n = self.n
        counts = self.support.sum(axis=1)
        width = int(counts.max())
        # Real neighbours first (in increasing order), padding (value n) last.
        keys = np.where(self.support, np.arange(n)[None, :], n)
        indices = np.sort(keys, axis=1)[:, :width].astype(np.int32)
        mask = indices < n
        indices.setflags(write=False)
        mask.setflags(write=False)
        return NeighborList(indices=indices, mask=mask)

    @functools.cached_property
    def in_degree(self) -> np.ndarray:
        """``[n]`` int, number of j != k with ``W[k, j] > 0`` (senders of node k)."""
        off = self.support & ~np.eye(self.n, dtype=bool)
        return off.sum(axis=1)

    @functools.cached_property
    def out_degree(self) -> np.ndarray:
        """``[n]`` int, number of k != j with ``W[k, j] > 0`` (receivers of node j)."""
        off = self.support & ~np.eye(self.n, dtype=bool)
        return off.sum(axis=0)

    @functools.cached_property
    def out_weight(self) -> np.ndarray:
        """``[n]`` column sums ``Σ_k W[k, j]`` (mean over the period if time-varying).

        A node's out-going weight: > 1 marks a dominant node, < 1 a peripheral one.
        """
        return self.stacked().sum(axis=1).mean(axis=0)

    @functools.cached_property
    def density(self) -> float:
        """Fraction of the ``n * n`` entries that are non-zero (union over the period)."""
        return float(self.support.mean())

    @functools.cached_property
    def spectral_gap(self) -> float:
        """``1 - |λ_2|``, with ``|λ_2|`` the second-largest eigenvalue modulus of ``W``.

        For a time-varying topology, ``1 - |λ_2(W^{P-1} ⋯ W^0)|^(1/P)`` (per-step rate of the
        product over one period). 1 for a single node; 0 when mixing does not contract
        (disconnected or periodic graphs).
        """
        if self.n == 1:
            return 1.0
        product = np.eye(self.n)
        for w in self.stacked():
            product = w @ product
        moduli = np.sort(np.abs(np.linalg.eigvals(product)))[::-1]
        second = min(float(moduli[1]), 1.0)
        return float(1.0 - second ** (1.0 / self.period))

    @functools.cached_property
    def is_doubly_stochastic(self) -> bool:
        """True when every column also sums to 1 (within 1e-8), at every step."""
        return bool(np.all(np.abs(self.stacked().sum(axis=1) - 1.0) <= 1e-8))

    @functools.cached_property
    def is_symmetric(self) -> bool:
        """True when ``W == W.T`` (within 1e-12), at every step."""
        stacked = self.stacked()
        return bool(np.allclose(stacked, np.swapaxes(stacked, 1, 2), rtol=0.0, atol=1e-12))

    @functools.cached_property
    def is_strongly_connected(self) -> bool:
        """True when the support graph (union over the period) is strongly connected."""
        return _strongly_connected(self.support)


def _reachable(support: np.ndarray, start: int) -> np.ndarray:
    """Nodes reachable from ``start`` along edges ``j -> k`` where ``support[k, j]``."""
    n = support.shape[0]
    receivers = [np.flatnonzero(support[:, j]) for j in range(n)]
    seen = np.zeros(n, dtype=bool)
    seen[start] = True
    stack = [start]
    while stack:
        j = stack.pop()
        for k in receivers[j]:
            if not seen[k]:
                seen[k] = True
                stack.append(int(k))
    return seen


def _strongly_connected(support: np.ndarray) -> bool:
    return bool(_reachable(support, 0).all() and _reachable(support.T, 0).all())


# --------------------------------------------------------------------------------------------
# Builders from matrices, adjacency and networkx
# --------------------------------------------------------------------------------------------


def from_matrix(matrix: Any, name: str = "custom") -> Topology:
    """Wraps a mixing matrix ``[n, n]`` or schedule ``[P, n, n]`` after validating it.

    Raises:
      ValueError: if the matrix is not square or not row-stochastic (see
        :func:`validate_mixing`).
    """
    if isinstance(matrix, jax.core.Tracer):
        raise ValueError(
            "from_matrix: matrix is a jax tracer; a Topology holds concrete host arrays "
            "(pass the traced matrix directly to the simulator instead)"
        )
    return Topology(matrix=matrix, name=name)


def _adjacency(adjacency: Any, where: str) -> np.ndarray:
    """Validates a 0/1 adjacency matrix and returns it as bool with an empty diagonal."""
    try:
        arr = np.asarray(adjacency)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: adjacency must be a numeric array") from err
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{where}: adjacency must be a square [n, n] array, got {arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError(f"{where}: adjacency must have at least one node, got {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: adjacency must be 0/1 or bool, got dtype {arr.dtype}")
    if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
        bad = tuple(np.argwhere(~np.isin(arr, (0, 1)))[0])
        raise ValueError(
            f"{where}: adjacency entries must be 0 or 1, got {arr[bad].item()!r} at "
            f"{_fmt_index(bad)}"
        )
    adj = arr.astype(bool)
    np.fill_diagonal(adj, False)
    return adj


def _metropolis_hastings(adj: np.ndarray) -> np.ndarray:
    """MH weights ``1 / (1 + max(d_k, d_j))`` on edges, the rest on the diagonal."""
    degree = adj.sum(axis=1)
    weights = np.where(adj, 1.0 / (1.0 + np.maximum.outer(degree, degree)), 0.0)
    weights[np.diag_indices_from(weights)] = 1.0 - weights.sum(axis=1)
    return weights


def from_adjacency(
    adjacency: Any, weights: str = "metropolis_hastings", name: str | None = None
) -> Topology:
    """Builds mixing weights on a given graph.

    Args:
      adjacency: ``[n, n]`` 0/1 or bool; ``adjacency[k, j]`` means j sends to k (same
        convention as the mixing matrix). The diagonal is ignored (self-weights are implied).
      weights: ``"metropolis_hastings"`` (undirected graphs only): ``W[k, j] =
        1 / (1 + max(d_k, d_j))`` on edges, node k keeps the rest — symmetric and doubly
        stochastic. ``"uniform"``: node k weighs itself and each of its in-neighbours (row k)
        equally, ``1 / (1 + d_k)``; works for directed graphs.
      name: topology name (default ``"adjacency_<weights>"``).

    Raises:
      ValueError: for a malformed adjacency, an unknown scheme, or a directed adjacency
        with ``"metropolis_hastings"``.
    """
    adj = _adjacency(adjacency, "from_adjacency")
    if weights not in _WEIGHT_SCHEMES:
        raise ValueError(
            f"from_adjacency: weights must be one of {_WEIGHT_SCHEMES}, got {weights!r}"
        )
    if weights == "metropolis_hastings":
        if not np.array_equal(adj, adj.T):
            raise ValueError(
                "from_adjacency: weights='metropolis_hastings' needs an undirected (symmetric) "
                "adjacency; use weights='uniform' for a directed graph"
            )
        matrix = _metropolis_hastings(adj)
    else:
        full = adj | np.eye(adj.shape[0], dtype=bool)
        matrix = full / full.sum(axis=1, keepdims=True)
    return Topology(matrix=matrix, name=name if name is not None else f"adjacency_{weights}")


def _node_order(graph: nx.Graph) -> list[Any]:
    nodes = list(graph.nodes)
    if set(nodes) == set(range(len(nodes))):
        return list(range(len(nodes)))
    return nodes


def from_networkx(
    graph: nx.Graph, weights: str = "metropolis_hastings", name: str | None = None
) -> Topology:
    """Builds a topology on a networkx graph.

    Nodes labelled ``0..n-1`` keep their labels as indices; other labels are indexed in
    ``graph.nodes`` order. A directed edge ``j -> k`` means j sends to k.

    Args:
      graph: an undirected ``nx.Graph`` or a directed ``nx.DiGraph``.
      weights: ``"metropolis_hastings"`` or ``"uniform"`` (see :func:`from_adjacency`; self
        loops are ignored), or ``"weight"``: use each edge's ``"weight"`` attribute as is,
        ``W[k, j] = weight(j -> k)`` (self loops give the diagonal), which inverts
        :func:`to_networkx`.
      name: topology name (default ``graph.name`` or ``"networkx"``).

    Raises:
      ValueError: for an empty graph, an unknown scheme or resulting weights that are not
        row-stochastic.
    """
    import networkx as nx  # loaded on first use (import dicejax stays light)

    if not isinstance(graph, nx.Graph):
        raise ValueError(f"from_networkx: graph must be a networkx graph, got {type(graph)}")
    if graph.number_of_nodes() < 1:
        raise ValueError("from_networkx: graph must have at least one node")
    if weights not in (*_WEIGHT_SCHEMES, "weight"):
        raise ValueError(
            f"from_networkx: weights must be one of {(*_WEIGHT_SCHEMES, 'weight')}, got {weights!r}"
        )
    name = name if name is not None else (graph.name or "networkx")
    order = _node_order(graph)
    if weights == "weight":
        # to_numpy_array gives M[j, k] = weight(j -> k); we need W[k, j].
        matrix = nx.to_numpy_array(graph, nodelist=order, weight="weight", dtype=float).T
        return Topology(matrix=matrix, name=name)
    adjacency = nx.to_numpy_array(graph, nodelist=order, weight=None, dtype=float).T
    return from_adjacency(adjacency != 0, weights=weights, name=name)


def to_networkx(topology: Topology) -> nx.DiGraph:
    """A ``nx.DiGraph`` with an edge ``j -> k`` of attribute ``weight = W[k, j]`` per non-zero.

    Self-weights become self loops; :func:`from_networkx` with ``weights="weight"`` inverts
    it. The graph's ``name`` is the topology's name.

    Raises:
      ValueError: for a time-varying topology (convert one step: ``from_matrix(t.at(s))``).
    """
    if not isinstance(topology, Topology):
        raise ValueError(f"to_networkx: topology must be a Topology, got {type(topology)}")
    if topology.is_time_varying:
        raise ValueError(
            f"to_networkx: topology {topology.name!r} is time-varying (period "
            f"{topology.period}); convert one step instead, e.g. from_matrix(topology.at(t))"
        )
    import networkx as nx  # loaded on first use (import dicejax stays light)

    graph = nx.DiGraph(name=topology.name)
    graph.add_nodes_from(range(topology.n))
    receivers, senders = np.nonzero(topology.matrix)
    graph.add_weighted_edges_from(
        (int(j), int(k), float(topology.matrix[k, j])) for k, j in zip(receivers, senders)
    )
    return graph


# --------------------------------------------------------------------------------------------
# Static builders
# --------------------------------------------------------------------------------------------


def _circulant(n: int, offsets: list[int], weight: float) -> np.ndarray:
    """``W[k, (k - o) mod n] += weight`` for each offset ``o``."""
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for offset in offsets:
        matrix[rows, (rows - offset) % n] += weight
    return matrix


def ring(n: int) -> Topology:
    """Ring: every node keeps 1/3 and takes 1/3 from each of its two neighbours.

    ``n = 2`` gives 1/2 each, ``n = 1`` the trivial ``[[1]]``. Symmetric, doubly stochastic;
    spectral gap ``1 - (1 + 2 cos(2π/n)) / 3`` for ``n >= 3``.
    """
    n = _check_int(n, "n", "ring", minimum=1)
    if n <= 2:
        return Topology(matrix=np.full((n, n), 1.0 / n), name=f"ring({n})")
    return Topology(matrix=_circulant(n, [0, 1, -1], 1.0 / 3.0), name=f"ring({n})")


def exponential(n: int) -> Topology:
    """Static exponential graph (directed circulant, as in the DICE paper).

    Node k receives from ``(k - o) mod n`` for offsets ``o`` in ``{0, 1, 2, 4, ...} < n``,
    all with weight ``1 / (number of offsets)``. Each node has ``⌊log2(n-1)⌋ + 1`` in- and
    out-neighbours (``n >= 2``). Doubly stochastic, not symmetric for ``n > 2`` in general.
    """
    n = _check_int(n, "n", "exponential", minimum=1)
    offsets = [0] + [2**i for i in range(max(n - 1, 1).bit_length()) if 2**i < n]
    return Topology(matrix=_circulant(n, offsets, 1.0 / len(offsets)), name=f"exponential({n})")


def _torus_adjacency(rows: int, cols: int, wrap: bool) -> np.ndarray:
    n = rows * cols
    adj = np.zeros((n, n), dtype=bool)
    r, c = np.divmod(np.arange(n), cols)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        rr, cc = r + dr, c + dc
        if wrap:
            rr, cc = rr % rows, cc % cols
            ok = np.ones(n, dtype=bool)
        else:
            ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        adj[np.arange(n)[ok], (rr * cols + cc)[ok]] = True
    np.fill_diagonal(adj, False)
    return adj


def torus(rows: int, cols: int) -> Topology:
    """2-D torus ``rows x cols`` (node ``k = r * cols + c``), uniform weights.

    Each node averages itself and its (up to) 4 wrap-around neighbours uniformly: 1/5 each
    when ``rows, cols >= 3``. On small sizes coinciding neighbours are merged (counted once),
    so e.g. ``torus(1, n)`` is ``ring(n)``. Symmetric and doubly stochastic.
    """
    rows = _check_int(rows, "rows", "torus", minimum=1)
    cols = _check_int(cols, "cols", "torus", minimum=1)
    adj = _torus_adjacency(rows, cols, wrap=True)
    return from_adjacency(adj, weights="uniform", name=f"torus({rows}x{cols})")


def grid(rows: int, cols: int) -> Topology:
    """2-D grid ``rows x cols`` without wrap-around, Metropolis–Hastings weights.

    Node ``k = r * cols + c``. Symmetric and doubly stochastic.
    """
    rows = _check_int(rows, "rows", "grid", minimum=1)
    cols = _check_int(cols, "cols", "grid", minimum=1)
    adj = _torus_adjacency(rows, cols, wrap=False)
    return from_adjacency(adj, name=f"grid({rows}x{cols})")


def hypercube(dim: int) -> Topology:
    """Hypercube on ``n = 2**dim`` nodes (k ~ k XOR 2^i), weights ``1/(dim+1)`` everywhere."""
    dim = _check_int(dim, "dim", "hypercube", minimum=0)
    n = 2**dim
    nodes = np.arange(n)
    adj = np.zeros((n, n), dtype=bool)
    for i in range(dim):
        adj[nodes, nodes ^ (1 << i)] = True
    return from_adjacency(adj, name=f"hypercube({dim})")


def complete(n: int) -> Topology:
    """Complete graph with uniform weights ``1/n`` (one gossip step = FedAvg averaging)."""
    n = _check_int(n, "n", "complete", minimum=1)
    return Topology(matrix=np.full((n, n), 1.0 / n), name=f"complete({n})")


def star(n: int) -> Topology:
    """Star with hub node 0 and ``n - 1`` leaves, Metropolis–Hastings weights.

    Hub and leaves exchange ``1/n``; each leaf keeps ``1 - 1/n``, the hub keeps ``1/n``.
    """
    n = _check_int(n, "n", "star", minimum=1)
    adj = np.zeros((n, n), dtype=bool)
    adj[0, 1:] = adj[1:, 0] = True
    return from_adjacency(adj, name=f"star({n})")


def _check_tries(max_tries: Any, where: str) -> int:
    return _check_int(max_tries, "max_tries", where, minimum=1)


def erdos_renyi(n: int, p: float, seed: int = 0, max_tries: int = 1000) -> Topology:
    """Connected Erdős–Rényi ``G(n, p)`` (undirected), Metropolis–Hastings weights.

    Graphs are drawn from ``numpy.random.default_rng(seed)`` until one is connected, so the
    result is a deterministic function of ``(n, p, seed)``.

    Raises:
      ValueError: for bad arguments, or when no connected graph came up in ``max_tries``
        draws (``p`` too small for ``n``).
    """
    n = _check_int(n, "n", "erdos_renyi", minimum=1)
    if isinstance(p, bool) or not isinstance(p, int | float | np.number) or not 0 <= p <= 1:
        raise ValueError(f"erdos_renyi: p must be a probability in [0, 1], got {p!r}")
    seed = _check_seed(seed, "erdos_renyi")
    max_tries = _check_tries(max_tries, "erdos_renyi")
    rng = np.random.default_rng(seed)
    name = f"erdos_renyi({n}, p={float(p):g}, seed={seed})"
    for _ in range(max_tries):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        adj = upper | upper.T
        if _strongly_connected(adj):
            return from_adjacency(adj, name=name)
    raise ValueError(
        f"erdos_renyi: no connected G(n={n}, p={float(p):g}) in max_tries={max_tries} draws "
        f"(seed={seed}); increase p (connectivity needs p above about ln(n)/n) or max_tries"
    )


def random_regular(n: int, degree: int, seed: int = 0, max_tries: int = 1000) -> Topology:
    """Connected random ``degree``-regular graph (undirected), weights ``1/(degree+1)``.

    Drawn with ``networkx.random_regular_graph`` from ``random.Random(seed)`` until connected.

    Raises:
      ValueError: if ``n * degree`` is odd, ``degree >= n``, the graph cannot be connected
        (``degree == 0`` with ``n > 1``, ``degree == 1`` with ``n > 2``), or no connected
        draw came up in ``max_tries``.
    """
    n = _check_int(n, "n", "random_regular", minimum=1)
    degree = _check_int(degree, "degree", "random_regular", minimum=0)
    seed = _check_seed(seed, "random_regular")
    max_tries = _check_tries(max_tries, "random_regular")
    if degree >= n:
        raise ValueError(f"random_regular: degree must be < n = {n}, got {degree}")
    if (n * degree) % 2:
        raise ValueError(f"random_regular: n * degree must be even, got n={n}, degree={degree}")
    if (degree == 0 and n > 1) or (degree == 1 and n > 2):
        raise ValueError(
            f"random_regular: a {degree}-regular graph on {n} nodes is never connected"
        )
    import networkx as nx  # loaded on first use (import dicejax stays light)

    rng = random.Random(seed)
    name = f"random_regular({n}, degree={degree}, seed={seed})"
    for _ in range(max_tries):
        graph = nx.random_regular_graph(degree, n, seed=rng)
        adj = nx.to_numpy_array(graph, nodelist=range(n), weight=None, dtype=float) != 0
        if _strongly_connected(adj):
            return from_adjacency(adj, name=name)
    raise ValueError(
        f"random_regular: no connected {degree}-regular graph on {n} nodes in "
        f"max_tries={max_tries} draws (seed={seed}); increase degree or max_tries"
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _check_path(path: Any, where: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{where}: path must be a str or os.PathLike, got {type(path)}")
    return Path(path)


def load_csv(path: str | os.PathLike, name: str | None = None) -> Topology:
    """Loads a topology from a comma-separated file of numbers.

    An ``[n, n]`` table is a static matrix; a ``[P * n, n]`` table (P > 1) is a schedule of
    P matrices stacked vertically, as written by :func:`save_csv`. Lines starting with ``#``
    are comments; a ``# name: ...`` comment sets the default name.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the contents are not a valid mixing matrix or schedule.
    """
    path = _check_path(path, "load_csv")
    if not path.is_file():
        raise FileNotFoundError(f"load_csv: no such file {str(path)!r}")
    text = path.read_text()
    if name is None:
        name = path.stem
        for line in text.splitlines():
            if line.startswith("# name:"):
                name = line[len("# name:") :].strip()
                break
    try:
        table = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"load_csv: {str(path)!r} is not a numeric CSV table: {err}") from err
    rows, cols = table.shape
    if cols < 1 or rows % cols:
        raise ValueError(
            f"load_csv: {str(path)!r} has shape {table.shape}; expected [n, n] or [P * n, n]"
        )
    if rows > cols:
        table = table.reshape(rows // cols, cols, cols)
    return Topology(matrix=table, name=name)


def save_csv(topology: Topology, path: str | os.PathLike) -> None:
    """Writes ``topology`` as CSV (``[P * n, n]`` for a schedule), atomically.

    Values are written with 17 significant digits, so :func:`load_csv` reads back the exact
    float64 matrix. The file is written to a temporary file in the same folder and moved into
    place with ``os.replace``.
    """
    if not isinstance(topology, Topology):
        raise ValueError(f"save_csv: topology must be a Topology, got {type(topology)}")
    path = _check_path(path, "save_csv")
    if not path.parent.is_dir():
        raise ValueError(f"save_csv: folder {str(path.parent)!r} does not exist")
    table = topology.stacked().reshape(-1, topology.n)
    header = f"name: {topology.name}\nn={topology.n}, period={topology.period}"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            np.savetxt(handle, table, delimiter=",", fmt="%.17g", header=header)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def designed16(path: str | os.PathLike | None = None) -> Topology:
    """The DICE paper's designed 16-node mixing matrix (row-stochastic, not doubly stochastic).

    The matrix ships with the package (``dicejax/resources/dice_designed16.csv``; its numbers
    come from the DICE authors' MIT-licensed experiment code, see the README beside it).
    Node 0 is the dominant node (out-going weight 1.7).

    Args:
      path: read the matrix from this CSV file instead (or from ``$DICEJAX_DESIGNED16`` when
        that is set); default: the bundled copy.

    Raises:
      ValueError: if the file does not hold a valid 16 x 16 mixing matrix.
      FileNotFoundError: if ``path`` does not exist.
    """
    if path is None:
        path = os.environ.get(DESIGNED16_ENV) or None
    if path is None:
        resource = importlib.resources.files("dicejax") / "resources" / DESIGNED16_FILE
        with importlib.resources.as_file(resource) as bundled:
            return _load_designed16(bundled, "designed16")
    path = _check_path(path, "designed16")
    if not path.is_file():
        raise FileNotFoundError(
            f"designed16: no such file {str(path)!r}; call designed16() without a path for "
            "the bundled copy of the paper's matrix"
        )
    return _load_designed16(path, "designed16")


def _load_designed16(path: Path, name: str) -> Topology:
    topology = load_csv(path, name=name)
    if topology.is_time_varying or topology.n != 16:
        raise ValueError(
            f"designed16: {str(path)!r} must hold a 16 x 16 matrix, got {topology.matrix.shape}"
        )
    return topology


# --------------------------------------------------------------------------------------------
# Time-varying schedules
# --------------------------------------------------------------------------------------------


def one_peer_exponential(n: int) -> Topology:
    """One-peer exponential graph: a periodic schedule of ``P = ceil(log2 n)`` matrices.

    At step t node k averages itself and node ``(k - 2^(t mod P)) mod n``, 1/2 each. Every
    step is doubly stochastic; for ``n`` a power of 2 the product over one period is exact
    averaging. ``n = 1`` gives ``[[[1]]]``.

    Returns:
      A Topology with ``matrix`` of shape ``[P, n, n]``.
    """
    n = _check_int(n, "n", "one_peer_exponential", minimum=1)
    if n == 1:
        return Topology(matrix=np.ones((1, 1, 1)), name="one_peer_exponential(1)")
    period = (n - 1).bit_length()  # == ceil(log2 n) for n >= 2
    matrix = np.stack([_circulant(n, [0, 2**t], 0.5) for t in range(period)])
    return Topology(matrix=matrix, name=f"one_peer_exponential({n})")


def random_matching(n: int, steps: int, seed: int = 0) -> Topology:
    """Random gossip: each step a uniformly random perfect matching, pairs average 1/2–1/2.

    With odd ``n`` one random node sits out each step (weight 1 on itself). Every step is
    symmetric and doubly stochastic.

    Returns:
      A Topology with ``matrix`` of shape ``[steps, n, n]`` (period = steps).
    """
    n = _check_int(n, "n", "random_matching", minimum=1)
    steps = _check_int(steps, "steps", "random_matching", minimum=1)
    seed = _check_seed(seed, "random_matching")
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(n), (steps, 1)), axis=1)
    matrix = np.zeros((steps, n, n))
    t = np.arange(steps)[:, None]
    a, b = perms[:, 0 : n - 1 : 2], perms[:, 1:n:2]
    matrix[t, a, a] = matrix[t, b, b] = matrix[t, a, b] = matrix[t, b, a] = 0.5
    if n % 2:
        idle = perms[:, -1]
        matrix[np.arange(steps), idle, idle] = 1.0
    return Topology(matrix=matrix, name=f"random_matching({n}, steps={steps}, seed={seed})")


# --------------------------------------------------------------------------------------------
# By name (CLI)
# --------------------------------------------------------------------------------------------


def _factor(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows`` the largest divisor of n that is <= sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _by_rows(builder: Callable[[int, int], Topology]) -> Callable[..., Topology]:
    def build(n: int, rows: int | None = None) -> Topology:
        if rows is None:
            rows, cols = _factor(n)
        else:
            rows = _check_int(rows, "rows", builder.__name__, minimum=1)
            if n % rows:
                raise ValueError(f"{builder.__name__}: rows={rows} does not divide n={n}")
            cols = n // rows
        return builder(rows, cols)

    return build


def _hypercube_n(n: int) -> Topology:
    if n & (n - 1):
        raise ValueError(f"hypercube: n must be a power of 2, got {n}")
    return hypercube(n.bit_length() - 1)


def _designed16_n(n: int, path: str | os.PathLike | None = None) -> Topology:
    if n != 16:
        raise ValueError(f"designed16: n must be 16, got {n}")
    return designed16(path)


_BY_NAME: dict[str, Callable[..., Topology]] = {
    "ring": ring,
    "exponential": exponential,
    "torus": _by_rows(torus),
    "grid": _by_rows(grid),
    "hypercube": _hypercube_n,
    "complete": complete,
    "star": star,
    "erdos_renyi": erdos_renyi,
    "random_regular": random_regular,
    "one_peer_exponential": one_peer_exponential,
    "random_matching": random_matching,
    "designed16": _designed16_n,
}


def by_name(name: str, n: int, **kwargs: Any) -> Topology:
    """Builds a topology on ``n`` nodes from its name (used by the CLI).

    Names: ``ring``, ``exponential``, ``torus`` and ``grid`` (``rows`` = largest divisor of n
    that is <= sqrt(n), or pass ``rows=``), ``hypercube`` (n a power of 2), ``complete``,
    ``star``, ``erdos_renyi`` (``p=``, ``seed=``), ``random_regular`` (``degree=``,
    ``seed=``), ``one_peer_exponential``, ``random_matching`` (``steps=``, ``seed=``) and
    ``designed16`` (n = 16, ``path=``). Extra keyword arguments go to the builder.

    Raises:
      ValueError: for an unknown name, missing or unexpected keyword arguments, or
        arguments the builder rejects.
    """
    if name not in _BY_NAME:
        raise ValueError(f"by_name: unknown topology {name!r}; choose one of {sorted(_BY_NAME)}")
    n = _check_int(n, "n", f"by_name({name!r})", minimum=1)
    builder = _BY_NAME[name]
    try:
        inspect.signature(builder).bind(n, **kwargs)
    except TypeError as err:
        raise ValueError(f"by_name({name!r}): bad keyword arguments {kwargs}: {err}") from err
    return builder(n, **kwargs)
