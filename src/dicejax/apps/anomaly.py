"""Anomaly detection from proximal influence: every node scores its own in-neighbours.

Node ``k`` can compute, locally, the proximal influence of each in-neighbour ``j``
(DESIGN §2.3, Definition 4)::

    P^t[k, j] = q_k W^t[k, j] g_k^{t+1} · v_j^t          (change in k's probe loss; > 0 = harm)

A neighbour whose batch is corrupted (labels permuted, inputs drowned in noise) sends updates
that raise ``k``'s probe loss far more than its honest peers' do. The detection rule:

1. **Accumulate** over a window of steps, dividing each step by the weight ``W^t[k, j]``
   (:func:`accumulate`): ``I[k, j] = Σ_t P^t[k, j] / W^t[k, j]`` over the steps where
   ``W^t[k, j] > 0``. The weight is ``k``'s own choice, not evidence about ``j``; without
   the division a heavily weighted honest neighbour looks more harmful than a lightly
   weighted attacker.
2. **Score** each edge against the rest of the neighbourhood (:func:`robust_zscores`): over
   ``k``'s in-neighbours ``N_k`` (``W[k, j] > 0``, ``j ≠ k``; ``k`` itself excluded) take
   the median ``m_k`` and the median absolute deviation ``MAD_k`` of ``I[k, ·]`` and set::

       z[k, j] = (I[k, j] − m_k) / s_k,     s_k = max(1.4826 · MAD_k, c · |m_k|)

   ``1.4826 · MAD`` estimates the standard deviation of a normal sample while ignoring a
   minority of outliers. The floor ``c · |m_k|`` (``min_scale``, default ``c = 0.25``) is
   needed because neighbourhoods are small (5 in the paper's 32-node exponential graph):
   the MAD of 5 numbers is often tiny by chance, which turns ordinary spread between honest
   neighbours into huge z-scores. With the floor, a neighbour is flagged only if its harm
   exceeds the typical neighbour's by 3.5 robust standard deviations *and* by at least
   ``3.5 c ≈ 0.9`` times the typical magnitude.
3. **Flag** one-sided (:func:`detect`): ``z[k, j] > threshold`` (default 3.5, the usual
   cut-off for robust z-scores). Only abnormally *harmful* neighbours are flagged; an
   abnormally helpful one, or a free-rider (``v_j = 0``, so ``P = 0``), is not.

Measured on Fashion-MNIST (32-node exponential graph, MLP, lr 0.1, batch 16, 512 samples
per node, one random attacker, 300 steps, the last 100 scored), seeds 0–9. ``min_scale``
and ``threshold`` were chosen on exploratory runs with seeds 0–4 (200 steps); the unseen
seeds 5–9 alone give ROC-AUC 1.0000 / 0.9982, precision 0.933 / 1.000, recall 1.0 / 0.68.

* label permutation: ROC-AUC 1.0000 ± 0.0000, precision 0.967, recall 1.000;
* Gaussian noise (std 10): ROC-AUC 0.9990 ± 0.0027, precision 1.000, recall 0.580 (the
  attacker is still every attacked node's top-ranked neighbour; ``threshold=2.5`` gives
  precision 0.963, recall 0.800);
* without the floor (``min_scale=0``): ROC-AUC 0.997 / 0.982, precision 0.65 / 0.60.

Limits: the median and MAD need about 4 or more in-neighbours; with 1–3 (e.g. the paper's
designed 16-node matrix) the z-scores carry little information, though the ranking of
``influence`` within a neighbourhood still finds the attacker. Only harm is flagged: in this
regime honest neighbours' accumulated proximal influence is itself positive (``g^{t+1}``
is taken after the step), so a free-rider (``P = 0``) ranks as the *least* harmful.

:func:`evaluate` scores a :class:`Detection` against the known attackers: an edge
``(k, j)`` is positive when ``j`` is an attacker; ROC-AUC (scikit-learn), precision and
recall of the flags, and how often an attacked neighbourhood's top-scored neighbour is an
attacker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dicejax.influence.proximal import proximal_steps

#: Consistency constant: ``1.4826 · MAD`` estimates the standard deviation of a normal sample.
MAD_TO_STD = 1.4826


class Detection(NamedTuple):
    """Every node's verdict on its in-neighbours.

    Attributes:
      influence: ``[n, n]`` accumulated (weight-normalised) proximal influence ``I[k, j]``
        of in-neighbour ``j`` on node ``k`` (> 0 = raised ``k``'s probe loss).
      scores: ``[n, n]`` robust z-score of edge ``(k, j)`` within ``k``'s in-neighbourhood;
        NaN where ``j`` is not an in-neighbour of ``k`` (and on the diagonal); ``+inf`` where
        the neighbourhood has no spread at all and ``j`` stands above it.
      flagged: ``[n, n]`` bool, ``k`` flags ``j`` (``scores > threshold``).
      edges: ``[n, n]`` bool, the scored edges (``W[k, j] > 0``, ``j ≠ k``).
    """

    influence: jax.Array
    scores: jax.Array
    flagged: jax.Array
    edges: jax.Array

    def flagged_neighbours(self) -> list[list[int]]:
        """For each node ``k``, the in-neighbours it flags (host-side lists)."""
        return [np.flatnonzero(row).tolist() for row in np.asarray(self.flagged)]


class DetectionMetrics(NamedTuple):
    """Quality of a :class:`Detection` against the known attackers.

    Attributes:
      roc_auc: ROC-AUC of ``scores`` over all scored edges (positive: ``j`` is an attacker).
      precision: flagged edges that are positive / flagged edges (1.0 if nothing is flagged).
      recall: flagged positive edges / positive edges.
      true_positives, false_positives, false_negatives: edge counts.
      top1: fraction of attacked neighbourhoods (nodes with an attacker among their
        in-neighbours) whose highest-scored in-neighbour is an attacker (NaN if none).
    """

    roc_auc: float
    precision: float
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int
    top1: float


# ---------------------------------------------------------------------------------------------
# Proximal influence over a window (:func:`dicejax.influence.proximal_steps`)


def accumulate(prox: jax.Array, matrices: jax.Array, normalize: bool = True) -> jax.Array:
    """Sums proximal influence over steps, optionally divided by the mixing weights.

    Args:
      prox: ``[S, n, n]`` per-step proximal influence, or ``[n, n]`` (one step or already
        summed; with ``normalize`` then divided by ``matrices`` ``[n, n]``).
      matrices: the mixing weights ``W^t``, ``[S, n, n]`` or ``[n, n]`` (static graph).
      normalize: divide each step by ``W^t[k, j]`` (zero where ``W^t[k, j] = 0``).

    Returns:
      ``[n, n]`` accumulated influence ``I[k, j]``.
    """
    prox, matrices = jnp.asarray(prox), jnp.asarray(matrices)
    if prox.ndim not in (2, 3) or prox.shape[-1] != prox.shape[-2]:
        raise ValueError(f"prox: must be [n, n] or [S, n, n], got shape {prox.shape}")
    if matrices.ndim not in (2, 3) or matrices.shape[-2:] != prox.shape[-2:] or (
            matrices.ndim == 3 and prox.ndim == 3 and matrices.shape[0] != prox.shape[0]):
        raise ValueError(f"matrices: shape {matrices.shape} does not match prox {prox.shape}")
    if matrices.ndim == 3 and prox.ndim == 2:
        raise ValueError("matrices: per-step matrices need per-step prox [S, n, n]")
    if normalize:
        prox = per_unit_weight(prox, matrices)
    return prox.sum(axis=0) if prox.ndim == 3 else prox


def per_unit_weight(prox: jax.Array, matrices: jax.Array) -> jax.Array:
    """``prox / W`` where ``W > 0``, else 0 (shapes as in :func:`accumulate`)."""
    w = jnp.asarray(matrices).astype(prox.dtype)
    return jnp.where(w > 0, prox / jnp.where(w > 0, w, 1), 0)


def accumulate_squares(prox: jax.Array, matrices: jax.Array, normalize: bool = True
                       ) -> jax.Array:
    """Like :func:`accumulate`, the sum over steps of the *squared* per-step influence
    (``[S, n, n]`` in; ``[n, n]`` out), the second moment :func:`t_statistic` needs."""
    prox = jnp.asarray(prox)
    if prox.ndim != 3:
        raise ValueError(f"prox: must be per-step [S, n, n], got shape {prox.shape}")
    if normalize:
        prox = per_unit_weight(prox, matrices)
    return jnp.square(prox).sum(axis=0)


def t_statistic(total: jax.Array, square: jax.Array, count) -> jax.Array:
    """Mean over standard error of per-step scores, from their sums.

    ``t = m / (sd / √S)`` with ``m = total / S`` and ``sd² = square / S − m²`` (``S`` may be
    a discounted count). A score that is large only on average, with a large spread (a
    noisy sender), gets a small ``|t|``; a consistent one a large ``|t|``.

    Args:
      total: ``[n, n]`` sum of the per-step scores.
      square: ``[n, n]`` sum of their squares.
      count: ``S``, the number (or discounted weight) of steps; scalar.

    Returns:
      ``[n, n]``: ``±inf`` where the spread is 0 and the mean is not, 0 where both are.
    """
    count = jnp.maximum(jnp.asarray(count, jnp.result_type(total)), 1e-30)
    m = total / count
    se = jnp.sqrt(jnp.maximum(square / count - m * m, 0) / count)
    flat = jnp.where(m != 0, jnp.sign(m) * jnp.inf, 0)
    return jnp.where(se > 0, m / jnp.where(se > 0, se, 1), flat)


def in_edges(matrices: jax.Array) -> jax.Array:
    """``[n, n]`` bool: ``j`` sends to ``k`` (``W^t[k, j] > 0`` at some step), ``j ≠ k``.

    Args:
      matrices: ``[n, n]`` or ``[S, n, n]``.
    """
    matrices = jnp.asarray(matrices)
    if matrices.ndim not in (2, 3) or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"matrices: must be [n, n] or [S, n, n], got shape {matrices.shape}")
    support = matrices > 0
    if support.ndim == 3:
        support = support.any(axis=0)
    return support & ~jnp.eye(support.shape[0], dtype=bool)


# ---------------------------------------------------------------------------------------------
# The rule


def robust_zscores(values: jax.Array, edges: jax.Array, min_scale: float = 0.25) -> jax.Array:
    """Robust z-score of every edge within its receiver's in-neighbourhood.

    ``z[k, j] = (x[k, j] − m_k) / max(1.4826 · MAD_k, min_scale · |m_k|)`` with ``m_k`` the
    median and ``MAD_k`` the median absolute deviation of ``x[k, j]`` over ``j`` with
    ``edges[k, j]``. Where the scale is zero, deviations give ``±inf`` and ties 0.

    Args:
      values: ``[n, n]`` scores ``x[k, j]`` (e.g. accumulated proximal influence).
      edges: ``[n, n]`` bool, which entries form each row's neighbourhood.
      min_scale: floor of the scale relative to ``|m_k|`` (``0`` = the plain MAD rule).

    Returns:
      ``[n, n]``; NaN outside ``edges`` and in rows without edges.
    """
    values, edges = jnp.asarray(values), jnp.asarray(edges)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"values: must be a square [n, n] matrix, got shape {values.shape}")
    if edges.shape != values.shape or edges.dtype != jnp.bool_:
        raise ValueError(f"edges: must be a bool [n, n] matrix like values, got "
                         f"{edges.shape} of {edges.dtype}")
    if not (np.isfinite(min_scale) and min_scale >= 0):
        raise ValueError(f"min_scale: must be a non-negative number, got {min_scale!r}")
    return _robust_z(values, edges, min_scale)


@jax.jit
def _robust_z(values, edges, min_scale):
    x = jnp.where(edges, values, jnp.nan)
    has = edges.any(axis=1, keepdims=True)
    safe = jnp.where(has, x, 0)  # rows without edges: avoid all-NaN medians
    med = jnp.nanmedian(safe, axis=1, keepdims=True)
    mad = jnp.nanmedian(jnp.abs(safe - med), axis=1, keepdims=True)
    scale = jnp.maximum(MAD_TO_STD * mad, min_scale * jnp.abs(med))
    dev = x - med
    z = jnp.where(scale > 0, dev / jnp.where(scale > 0, scale, 1),
                  jnp.where(dev == 0, 0.0, jnp.sign(dev) * jnp.inf))
    return jnp.where(edges & has, z, jnp.nan)


def detect(influence: jax.Array, edges: jax.Array, threshold: float = 3.5,
           min_scale: float = 0.25) -> Detection:
    """Every node flags the in-neighbours whose influence is abnormally harmful.

    Args:
      influence: ``[n, n]`` accumulated proximal influence (:func:`accumulate`; or
        ``dicejax.influence.ledger(...).proximal``, divided by a static ``W``).
      edges: ``[n, n]`` bool in-neighbourhoods (:func:`in_edges`).
      threshold: flag ``z > threshold`` (one-sided: harmful only).
      min_scale: see :func:`robust_zscores`.

    Returns:
      A :class:`Detection`.
    """
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: must be a finite number, got {threshold!r}")
    influence = jnp.asarray(influence)
    z = robust_zscores(influence, edges, min_scale)
    flagged = jnp.asarray(edges) & (jnp.nan_to_num(z, nan=-jnp.inf) > threshold)
    return Detection(jnp.where(edges, influence, jnp.nan), z, flagged, jnp.asarray(edges))


# ---------------------------------------------------------------------------------------------
# The combined detector: harmful, low-effort and outsized updates

KINDS = ("none", "harmful", "low_effort", "outsized")
"""Suspected attack types, by code: ``1`` harmful influence (e.g. corrupted labels), ``2``
low effort (updates far smaller than the neighbourhood's: free-riders), ``3`` outsized
updates (far larger: noise, boosting)."""


def update_norms(traj: Any) -> jax.Array:
    """``[T, n]``: the norm of every local update ``‖θ_k^{t+½} − θ_k^t‖`` (all float leaves
    of a node together) of a recorded trajectory."""
    if getattr(traj, "half_params", None) is None or getattr(traj, "params", None) is None:
        raise ValueError("traj: needs a recorded trajectory (record=True)")
    return _update_norms(traj.half_params, traj.params)


@jax.jit
def _update_norms(half, params):
    sq = [jnp.sum(jnp.square(h - p[:-1]).reshape(h.shape[0], h.shape[1], -1), axis=-1)
          for h, p in zip(jax.tree.leaves(half), jax.tree.leaves(params), strict=True)
          if jnp.issubdtype(h.dtype, jnp.inexact)]
    return jnp.sqrt(sum(sq))


class Suspicion(NamedTuple):
    """The combined verdict of every node on its in-neighbours.

    Attributes:
      kind: ``[n, n]`` int, the suspected type of edge ``(k, j)`` (codes of :data:`KINDS`;
        0 for unflagged edges and non-edges).
      relative_norm: ``[n, n]`` ``j``'s mean update norm over the median of ``k``'s
        in-neighbours' (NaN off the edges).
      flagged: ``[n, n]`` bool, ``kind > 0``.
      edges: ``[n, n]`` bool, the scored edges.
    """

    kind: jax.Array
    relative_norm: jax.Array
    flagged: jax.Array
    edges: jax.Array

    def suspected(self) -> dict[int, str]:
        """Node ``j`` → the type most of the nodes that flag it suspect (ties: the lower
        code), for every flagged node."""
        kind, flagged = np.asarray(self.kind), np.asarray(self.flagged)
        out = {}
        for j in np.flatnonzero(flagged.any(axis=0)):
            votes = np.bincount(kind[flagged[:, j], j], minlength=len(KINDS))
            out[int(j)] = KINDS[int(np.argmax(votes[1:]) + 1)]
        return out


def classify(detection: Detection, norms: jax.Array, low: float = 0.1,
             high: float = 5.0) -> Suspicion:
    """Adds update sizes to a :class:`Detection`: free-riders and noise too.

    Node ``k`` compares each in-neighbour's mean update norm with the median over its
    in-neighbourhood, ``r[k, j] = ‖v_j‖ / median_{j' ∈ N_k} ‖v_j'‖``, and suspects
    ``low_effort`` where ``r < low`` (a free-rider's updates are zero), ``outsized`` where
    ``r > high``, else ``harmful`` where the detection flagged the edge.

    Args:
      detection: from :func:`detect`.
      norms: ``[n]`` each node's mean update norm over the window (:func:`update_norms`).
      low: ratio below which updates count as low effort (in ``[0, 1)``).
      high: ratio above which they count as outsized (above 1).

    Returns:
      A :class:`Suspicion`.
    """
    if not (np.isfinite(low) and 0 <= low < 1):
        raise ValueError(f"low: must lie in [0, 1), got {low!r}")
    if not (np.isfinite(high) and high > 1):
        raise ValueError(f"high: must be a finite number above 1, got {high!r}")
    edges = jnp.asarray(detection.edges)
    norms = jnp.asarray(norms)
    if norms.shape != edges.shape[:1]:
        raise ValueError(f"norms: must have shape [n] = ({edges.shape[0]},), got {norms.shape}")
    x = jnp.where(edges, norms[None, :], jnp.nan)
    med = jnp.nanmedian(jnp.where(edges.any(1, keepdims=True), x, 1.0), axis=1, keepdims=True)
    ratio = jnp.where(edges, x / jnp.where(med > 0, med, 1.0), jnp.nan)
    kind = jnp.where(ratio < low, 2, jnp.where(ratio > high, 3,
                                               jnp.where(detection.flagged, 1, 0)))
    kind = jnp.where(edges, kind, 0).astype(jnp.int32)
    return Suspicion(kind, ratio, kind > 0, edges)


# ---------------------------------------------------------------------------------------------
# Evaluation against known attackers


def edge_labels(edges: jax.Array, attackers: Sequence[int]) -> np.ndarray:
    """``[n, n]`` bool: edge ``(k, j)`` is scored and its sender ``j`` is an attacker."""
    edges = np.asarray(edges)
    n = edges.shape[0]
    idx = np.asarray(list(attackers), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"attackers: node indices must lie in [0, {n}), got {idx.tolist()}")
    is_attacker = np.zeros(n, bool)
    is_attacker[idx] = True
    return edges & is_attacker[None, :]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for binary ``labels`` (``sklearn.metrics.roc_auc_score``).

    Infinite scores are mapped to the largest finite float of their sign (so they rank
    first or last); ties count one half.

    Args:
      scores: ``[m]`` real scores (higher = more likely positive); no NaN.
      labels: ``[m]`` bool, both classes present.

    Returns:
      The area under the ROC curve, in ``[0, 1]``.
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"labels: shape {labels.shape} does not match scores {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores: contain NaN")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("labels: need both positive and negative entries for a ROC-AUC")
    return float(roc_auc_score(labels, np.nan_to_num(scores)))


def evaluate(detection: Detection, attackers: Sequence[int],
             flagged: jax.Array | None = None) -> DetectionMetrics:
    """Scores a :class:`Detection` against the known attackers (edge-level).

    Args:
      detection: from :func:`detect`.
      flagged: optional ``[n, n]`` bool flags to score instead of the detection's own (e.g.
        :attr:`Suspicion.flagged`); ROC-AUC and top-1 stay those of its scores.
      attackers: the attacking node indices (at least one must send to someone).

    Returns:
      A :class:`DetectionMetrics`.
    """
    edges = np.asarray(detection.edges)
    pos = edge_labels(edges, attackers)
    scores = np.asarray(detection.scores, np.float64)
    flagged = np.asarray(detection.flagged if flagged is None else flagged) & edges
    tp = int((flagged & pos).sum())
    fp = int((flagged & ~pos).sum())
    fn = int((~flagged & pos).sum())
    auc = roc_auc(scores[edges], pos[edges])
    attacked = pos.any(axis=1)
    ranked = np.where(edges, np.nan_to_num(scores, nan=-np.inf, posinf=np.finfo(float).max),
                      -np.inf)
    top = ranked.argmax(axis=1)
    hits = pos[np.arange(len(top)), top][attacked]
    top1 = float(hits.mean()) if hits.size else float("nan")
    return DetectionMetrics(
        roc_auc=auc,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        recall=tp / (tp + fn) if tp + fn else 1.0,
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        top1=top1,
    )


__all__ = [
    "KINDS",
    "MAD_TO_STD",
    "Detection",
    "DetectionMetrics",
    "Suspicion",
    "accumulate",
    "accumulate_squares",
    "classify",
    "detect",
    "edge_labels",
    "evaluate",
    "in_edges",
    "per_unit_weight",
    "proximal_steps",
    "robust_zscores",
    "roc_auc",
    "t_statistic",
    "update_norms",
]
