"""Byzantine-robust gossip: aggregation rules that bound what a corrupt in-neighbour can do.

Plain gossip averages, ``θ_k ← Σ_j W[k, j] θ_j``, so one in-neighbour that sends garbage
moves node ``k`` by its weight times the garbage. The rules here replace that average in the
combine step of :func:`dicejax.simulate` (``aggregator=``), with the graph's support deciding
who node ``k`` hears at step ``t`` (its in-neighbours ``N_k^t = {j : W^t[k, j] ≠ 0}`` and
itself):

* :func:`trimmed_mean` — coordinate-wise trimmed mean: per coordinate, the ``b`` largest and
  the ``b`` smallest of the ``|N_k^t ∪ {k}|`` values are dropped and the rest averaged
  (unweighted), as in BRIDGE-T (Yang & Bajwa, 2019). Every node needs more than ``2b``
  values.
* :func:`median` — coordinate-wise median of the same values (the mean of the two middle
  ones for an even count), BRIDGE-M.
* :func:`clipped_gossip` — self-centred clipping (He, Karimireddy & Jaggi, 2022,
  "Byzantine-robust decentralized learning via self-centered clipping"):
  ``θ_k ← θ_k + Σ_j W[k, j] clip(θ_j − θ_k, τ_k)`` with ``clip(z, τ) = z · min(1, τ / ‖z‖)``
  over the whole parameter vector of a node. ``τ`` is fixed, or per node and step the
  ``quantile`` of its in-neighbours' distances ``‖θ_j − θ_k‖`` (a heuristic: the default
  0.5 clips every neighbour farther than the median one).

The rules use the weights' *support*; trimmed mean and median ignore their values (each heard
node counts once), clipped gossip keeps them. A rule is an :class:`Aggregator`;
:meth:`Aggregator.wrap` turns a :class:`~dicejax.mixing.Mixer` into a :class:`RobustMixer`,
which a :class:`~dicejax.simulator.Simulator` runs like any mixer. The rules are not linear in
the parameters, so DICE's estimators, which linearise the gossip through ``W``, refuse such
trajectories; the re-run forms (``dice_gt``, ``apps.contribution.leave_one_out``) run the same
rule and stay exact.

With ``finite`` flags (``simulate(..., on_divergence="isolate")``) a non-finite in-neighbour is
not heard at all (as if its edge were absent that step); a non-finite node stays non-finite.

Example::

    traj = dj.simulate(loss_fn, params, batches, topo,
                       aggregator=dj.robust.trimmed_mean(trim=1))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import pytrees
from dicejax.mixing import Mixer

PyTree = Any

RULES = ("trimmed_mean", "median", "clipped_gossip")


class Aggregator(NamedTuple):
    """A robust aggregation rule (made by :func:`trimmed_mean`, :func:`median` or
    :func:`clipped_gossip`).

    Attributes:
      rule: ``"trimmed_mean"``, ``"median"`` or ``"clipped_gossip"``.
      trim: ``b``, values dropped at each end (trimmed mean).
      tau: fixed clipping radius, or None for the per-node ``quantile`` rule.
      quantile: in ``(0, 1]``, the radius' quantile of the in-neighbours' distances.
    """

    rule: str
    trim: int = 0
    tau: float | None = None
    quantile: float = 0.5

    def wrap(self, mixer: Mixer) -> RobustMixer:
        """The robust gossip operator over ``mixer``'s graph.

        Args:
          mixer: a single-device :class:`~dicejax.mixing.Mixer` with concrete matrices.

        Raises:
          ValueError: for another kind of mixer, traced matrices, or a trimmed mean that
            leaves some node no value (``|N_k^t ∪ {k}| <= 2 · trim`` at some step).
        """
        if not isinstance(mixer, Mixer):
            raise ValueError(f"aggregator: robust gossip needs a dicejax.mixing.Mixer "
                             f"(one device), got {type(mixer).__name__}")
        if isinstance(mixer.matrices, jax.core.Tracer):
            raise ValueError("aggregator: robust gossip needs a concrete matrix (the support "
                             "decides who is heard), got a traced one")
        mats = np.asarray(mixer.matrices)
        n = mats.shape[-1]
        heard = (mats != 0) | np.eye(n, dtype=bool)[None]  # [P, n, n]
        if self.rule == "trimmed_mean":
            least = int(heard.sum(-1).min())
            if least <= 2 * self.trim:
                raise ValueError(f"trim: a node hears only {least} values (itself included) "
                                 f"at some step; trim={self.trim} needs more than "
                                 f"{2 * self.trim}")
        support = heard.any(0)
        width = int(support.sum(-1).max())
        indices = np.full((n, width), n, np.int32)
        for k in range(n):
            nbrs = np.flatnonzero(support[k])
            indices[k, :nbrs.size] = nbrs
        return RobustMixer(mixer, jnp.asarray(indices), self)


def trimmed_mean(trim: int = 1) -> Aggregator:
    """Coordinate-wise trimmed mean over each node's in-neighbours and itself.

    Args:
      trim: ``b >= 0``, the values dropped at each end per coordinate (``0``: the unweighted
        mean of the heard values).

    Returns:
      An :class:`Aggregator`.
    """
    if isinstance(trim, bool) or not isinstance(trim, int | np.integer) or trim < 0:
        raise ValueError(f"trim: must be a non-negative integer, got {trim!r}")
    return Aggregator("trimmed_mean", trim=int(trim))


def median() -> Aggregator:
    """Coordinate-wise median over each node's in-neighbours and itself."""
    return Aggregator("median")


def clipped_gossip(tau: float | None = None, quantile: float = 0.5) -> Aggregator:
    """Self-centred clipping: ``θ_k ← θ_k + Σ_j W[k, j] clip(θ_j − θ_k, τ_k)``.

    Args:
      tau: a fixed radius (positive, finite), or None: per node and step, ``τ_k`` is the
        ``quantile`` of its in-neighbours' distances ``‖θ_j − θ_k‖`` (self excluded).
      quantile: in ``(0, 1]`` (used when ``tau`` is None; 1 clips nobody).

    Returns:
      An :class:`Aggregator`.
    """
    if tau is not None and (isinstance(tau, bool)
                            or not isinstance(tau, int | float | np.integer | np.floating)
                            or not (np.isfinite(tau) and tau > 0)):
        raise ValueError(f"tau: must be None or a positive finite number, got {tau!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, int | float | np.floating) \
            or not 0 < quantile <= 1:
        raise ValueError(f"quantile: must lie in (0, 1], got {quantile!r}")
    return Aggregator("clipped_gossip", tau=None if tau is None else float(tau),
                      quantile=float(quantile))


def by_name(name: str, **kwargs: Any) -> Aggregator:
    """An :class:`Aggregator` by rule name (keyword arguments go to its factory)."""
    factories = {"trimmed_mean": trimmed_mean, "median": median,
                 "clipped_gossip": clipped_gossip}
    if name not in factories:
        raise ValueError(f"aggregator: unknown rule {name!r}; choose one of {list(RULES)}")
    return factories[name](**kwargs)


def as_aggregator(value: Aggregator | str | None) -> Aggregator | None:
    """None or ``"mean"`` (plain gossip), a rule name, or an :class:`Aggregator`."""
    if value is None or value == "mean":
        return None
    if isinstance(value, Aggregator):
        return value
    if isinstance(value, str):
        return by_name(value)
    raise ValueError(f"aggregator: must be None, 'mean', a rule name {list(RULES)} or a "
                     f"dicejax.robust.Aggregator, got {value!r}")


@pytrees.dataclass
class RobustMixer:
    """Robust gossip over a graph (a pytree; enters ``jit`` and ``scan`` like a Mixer).

    Attributes:
      base: the plain :class:`~dicejax.mixing.Mixer` (its matrices give the support and,
        for clipped gossip, the weights).
      indices: ``[n, D]`` int32, each node's heard nodes over the whole period (itself
        included), padded with ``n``.
      aggregator: the rule.
    """

    base: Mixer
    indices: jax.Array
    aggregator: Aggregator = pytrees.static_field()

    @property
    def period(self) -> int:
        return self.base.period

    @property
    def method(self) -> str:
        return self.aggregator.rule

    @property
    def matrices(self) -> jax.Array:
        """The graph's ``[P, n, n]`` matrices (who is heard; clipped gossip's weights)."""
        return self.base.matrices

    def matrix_at(self, t) -> jax.Array:
        """``W^t`` ``[n, n]`` of the graph."""
        return self.base.matrix_at(t)

    def heard_at(self, t, finite: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(heard [n, D] bool, weights [n, D])`` of step ``t``: slot ``d`` of node ``k``
        is heard when ``W^t[k, indices[k, d]] ≠ 0`` or it is ``k`` itself (and, with
        ``finite``, that node is finite)."""
        n = self.indices.shape[0]
        safe = jnp.minimum(self.indices, n - 1)
        w = jnp.take_along_axis(self.base.matrix_at(t), safe, axis=1)
        real = self.indices < n
        heard = real & ((w != 0) | (self.indices == jnp.arange(n)[:, None]))
        if finite is not None:
            heard = heard & finite[safe]
        return heard, jnp.where(real, w, 0)

    def apply(self, t, tree: PyTree, finite: jax.Array | None = None) -> PyTree:
        """Robust gossip of ``tree`` (leaves ``[n, ...]``) at step ``t``.

        Args:
          t: the global step (may be traced).
          tree: pytree, leaves ``[n, ...]``.
          finite: optional ``[n]`` bool: non-finite nodes are not heard, and stay NaN.
        """
        heard, w = self.heard_at(t, finite)
        rule = self.aggregator.rule
        if rule == "clipped_gossip":
            out = _clipped(self.indices, heard, w, tree, self.aggregator)
        else:
            out = jax.tree.map(lambda x: _order_statistic(x, self.indices, heard, rule,
                                                          self.aggregator.trim), tree)
        if finite is None:
            return out

        def keep_nan(y):
            if not jnp.issubdtype(y.dtype, jnp.inexact):
                return y
            return jnp.where(finite.reshape((-1,) + (1,) * (y.ndim - 1)), y,
                             jnp.asarray(jnp.nan, y.dtype))

        return jax.tree.map(keep_nan, out)


def sorting_network(width: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs ``(i, j)``, ``i < j``, that sort ``width`` values ascending
    (odd-even transposition: ``width`` rounds of alternating neighbour pairs)."""
    return [(i, i + 1) for r in range(width) for i in range(r % 2, width - 1, 2)]


def _order_statistic(x: jax.Array, indices: jax.Array, heard: jax.Array, rule: str,
                     trim: int) -> jax.Array:
    """Coordinate-wise trimmed mean or median of each node's heard values of one leaf.

    The ``D`` slots are sorted by a sorting network of elementwise ``min`` / ``max`` (XLA
    fuses it into one loop; a generic sort along a short axis is many times slower on the
    CPU), unheard slots as ``+inf`` at the end; the statistic then picks ranks per node.
    """
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    num = indices.shape[1]
    shape = (-1,) + (1,) * (x.ndim - 1)
    inf = jnp.asarray(jnp.inf, x.dtype)
    slots = [jnp.where(heard[:, d].reshape(shape),
                       jnp.take(x, indices[:, d], axis=0, mode="fill", fill_value=0), inf)
             for d in range(num)]
    for i, j in sorting_network(num):
        slots[i], slots[j] = jnp.minimum(slots[i], slots[j]), jnp.maximum(slots[i], slots[j])
    count = heard.sum(1).reshape(shape)  # [n, 1, ...]
    if rule == "median":
        lo, hi = (count - 1) // 2, count // 2
        pick_lo = sum(jnp.where(lo == r, v, 0) for r, v in enumerate(slots))
        pick_hi = sum(jnp.where(hi == r, v, 0) for r, v in enumerate(slots))
        return (pick_lo + pick_hi) / 2
    b = jnp.minimum(trim, (count - 1) // 2)  # a node left with too few values keeps one
    total = sum(jnp.where((r >= b) & (r < count - b), v, 0) for r, v in enumerate(slots))
    return total / (count - 2 * b).astype(x.dtype)


def _clipped(indices: jax.Array, heard: jax.Array, w: jax.Array, tree: PyTree,
             agg: Aggregator) -> PyTree:
    """Self-centred clipping over all float leaves of a node together (unrolled over the
    ``D`` slots, one fused gather per slot as in :func:`dicejax.mixing.gossip_sparse`)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return tree
    n, num = indices.shape

    def diff(x, d):  # [n, ...]: slot d's value minus the node's own; 0 where unheard
        z = jnp.take(x, indices[:, d], axis=0, mode="fill", fill_value=0) - x
        return jnp.where(heard[:, d].reshape((-1,) + (1,) * (x.ndim - 1)), z, 0)

    dist = jnp.sqrt(jnp.stack([sum(jnp.sum(jnp.square(diff(x, d)).reshape(n, -1), axis=1)
                                   for x in leaves) for d in range(num)], axis=1))  # [n, D]
    if agg.tau is not None:
        tau = jnp.full((n,), agg.tau, dist.dtype)
    else:
        others = heard & (indices != jnp.arange(n)[:, None])
        tau = _masked_quantile(dist, others, agg.quantile)
    scale = jnp.where(dist > tau[:, None], tau[:, None] / jnp.where(dist > 0, dist, 1), 1)
    coef = jnp.where(heard, w, 0) * scale  # [n, D]

    def mix(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        shape = (-1,) + (1,) * (x.ndim - 1)
        c = coef.astype(x.dtype)
        return x + sum(c[:, d].reshape(shape) * diff(x, d) for d in range(num))

    return jax.tree.map(mix, tree)


def _masked_quantile(values: jax.Array, mask: jax.Array, q: float) -> jax.Array:
    """Per row of ``values`` ``[n, D]``, the ``q`` quantile (linear interpolation, numpy's
    default) of the entries where ``mask``; ``+inf`` (clip nobody) for an empty row."""
    ranked = jnp.sort(jnp.where(mask, values, jnp.inf), axis=1)
    count = mask.sum(1)
    pos = q * (jnp.maximum(count, 1) - 1).astype(values.dtype)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    a = jnp.take_along_axis(ranked, lo[:, None], axis=1)[:, 0]
    b = jnp.take_along_axis(ranked, hi[:, None], axis=1)[:, 0]
    out = a + (pos - lo) * jnp.where(hi > lo, b - a, 0)
    return jnp.where(count > 0, out, jnp.inf)


__all__ = [
    "RULES",
    "Aggregator",
    "RobustMixer",
    "as_aggregator",
    "by_name",
    "clipped_gossip",
    "median",
    "sorting_network",
    "trimmed_mean",
]
