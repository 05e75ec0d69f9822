"""Per-node contribution ledger over a run: who helped the network, who free-rode, who harmed.

The basis is the full-trajectory attribution (DESIGN §2.4,
:func:`dicejax.influence.trajectory_attribution`): ``A[t, j]``, the first-order effect of node
``j``'s local update at step ``t`` on the final probe objective ``Σ_k q_k L(θ_k^T; z')``
(negative = helpful). Summed over steps it is node ``j``'s network-level influence over the
whole run, ``I_j = Σ_t A[t, j]``.

* **contribution** ``c_j = −I_j``: positive = the node's data lowered the network's final
  probe loss (helpful), negative = it raised it (harmful), zero = a free-rider (``v_j = 0``,
  so its gate has no effect).
* **shares**, two normalisations (:func:`shares`):

  - ``"signed"``: ``c_j / Σ_k |c_k|`` — keeps the sign, so harm shows as a negative share;
    ``Σ_j |share_j| = 1``.
  - ``"clipped"``: ``max(c_j, 0) / Σ_k max(c_k, 0)`` — a payout rule: harmful nodes and
    free-riders get 0, the helpful ones split 1 (all zeros if nobody helped).

* **reciprocity** (optional): the accumulated proximal influence ``P[k, j]``
  (:func:`dicejax.influence.ledger` ``.proximal``, summed over steps) and each node's
  neighbourhood factor (:func:`dicejax.influence.neighbourhood_factor`, out-going over
  in-coming). Proximal influence is a loss change (> 0 = harm), so we also report the
  helpfulness given and received, ``−Σ_{k≠j} P[k, j]`` and ``−Σ_{k≠j} P[j, k]``.

Everything here is a pure function of a recorded trajectory or of arrays.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from dicejax.influence import ledger as ledger_fn
from dicejax.influence import neighbourhood_factor, trajectory_attribution
from dicejax.simulator import LossFn
from dicejax.trajectory import Trajectory

PyTree = Any
ShareMode = Literal["signed", "clipped"]


class Reciprocity(NamedTuple):
    """Proximal (neighbour-to-neighbour) exchange summarised per node.

    Attributes:
      proximal: ``[n, n]`` accumulated proximal influence ``P[k, j]`` (> 0 = ``j`` harmed ``k``).
      given: ``[n]`` helpfulness node ``j`` gave its out-neighbours, ``−Σ_{k≠j} P[k, j]``.
      received: ``[n]`` helpfulness node ``k`` received, ``−Σ_{j≠k} P[k, j]``.
      factor: ``[n]`` neighbourhood factor (out-going over in-coming ``P``; NaN if none).
    """

    proximal: jax.Array
    given: jax.Array
    received: jax.Array
    factor: jax.Array


class Contribution(NamedTuple):
    """A run's contribution ledger.

    Attributes:
      per_step: ``[T, n]`` attribution ``A[t, j]`` (negative = helpful).
      influence: ``[n]`` ``Σ_t A[t, j]``.
      contribution: ``[n]`` ``−influence`` (positive = helpful).
      shares: ``[n]`` signed shares ``c_j / Σ|c|``.
      clipped_shares: ``[n]`` ``max(c, 0) / Σ max(c, 0)``.
      reciprocity: a :class:`Reciprocity`, or ``None`` when not computed.
    """

    per_step: jax.Array
    influence: jax.Array
    contribution: jax.Array
    shares: jax.Array
    clipped_shares: jax.Array
    reciprocity: Reciprocity | None = None


def shares(contribution: jax.Array, mode: ShareMode = "signed") -> jax.Array:
    """Normalised contribution shares.

    Args:
      contribution: ``[n]`` contributions (positive = helpful).
      mode: ``"signed"`` (``c / Σ|c|``, ``Σ|share| = 1``) or ``"clipped"``
        (``max(c, 0) / Σ max(c, 0)``, non-negative, sums to 1 unless nobody helped).

    Returns:
      ``[n]``; all zeros when the normaliser is zero.
    """
    c = jnp.asarray(contribution)
    if c.ndim != 1:
        raise ValueError(f"contribution: must be a vector [n], got shape {c.shape}")
    if mode == "signed":
        num, den = c, jnp.sum(jnp.abs(c))
    elif mode == "clipped":
        num = jnp.maximum(c, 0)
        den = jnp.sum(num)
    else:
        raise ValueError(f"mode: must be 'signed' or 'clipped', got {mode!r}")
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(c))


def reciprocity_summary(prox: jax.Array) -> Reciprocity:
    """Summarises an accumulated proximal-influence matrix ``[n, n]`` per node (given,
    received, neighbourhood factor); see :func:`dicejax.influence.reciprocity` for the
    pairwise ratio of Definition 5."""
    prox = jnp.asarray(prox)
    if prox.ndim != 2 or prox.shape[0] != prox.shape[1]:
        raise ValueError(f"prox: must be a square [n, n] matrix, got shape {prox.shape}")
    off = prox * (1 - jnp.eye(prox.shape[0], dtype=prox.dtype))
    return Reciprocity(prox, -off.sum(axis=0), -off.sum(axis=1), neighbourhood_factor(prox))


def from_attribution(attribution: jax.Array, prox: jax.Array | None = None) -> Contribution:
    """Builds the ledger from a ``[T, n]`` attribution (and optionally ``[n, n]`` proximal).

    Args:
      attribution: ``[T, n]`` per-(step, node) influence (negative = helpful), e.g. from
        :func:`dicejax.influence.trajectory_attribution`, or ``ledger(...).network``.
      prox: ``[n, n]`` accumulated proximal influence, or ``None``.

    Returns:
      A :class:`Contribution`.
    """
    a = jnp.asarray(attribution)
    if a.ndim != 2:
        raise ValueError(f"attribution: must be [T, n], got shape {a.shape}")
    influence = jnp.sum(a, axis=0)
    c = jnp.where(influence == 0, jnp.zeros_like(influence), -influence)  # no "−0" shares
    return Contribution(a, influence, c, shares(c, "signed"), shares(c, "clipped"),
                        None if prox is None else reciprocity_summary(prox))


def contributions(loss_fn: LossFn, traj: Trajectory, probe: PyTree,
                  node_weights: jax.Array | None = None, *, proximal: bool = False,
                  remat: bool = True) -> Contribution:
    """Every node's contribution to the final probe objective over a recorded run.

    One reverse pass through the re-run (:func:`dicejax.influence.trajectory_attribution`);
    with ``proximal=True`` also one jitted :func:`dicejax.influence.ledger` pass (``hops=1``,
    every step up to ``T − 1``) for the reciprocity summaries.

    Args:
      loss_fn: one node's loss.
      traj: trajectory recorded with ``record=True`` (update gates such as free-riders are
        part of it).
      probe: probe batch ``z'``.
      node_weights: ``q`` ``[n]`` (default ``1/n``).
      proximal: also compute :class:`Reciprocity`.
      remat: rematerialise the scan body in the backward pass.

    Returns:
      A :class:`Contribution`.
    """
    attribution = trajectory_attribution(loss_fn, traj, probe, node_weights, remat=remat)
    prox = None
    if proximal:
        prox = ledger_fn(loss_fn, traj, probe, hops=1, node_weights=node_weights).proximal
    return from_attribution(attribution, prox)


def reciprocity(prox: jax.Array) -> Reciprocity:
    """Deprecated name of :func:`reciprocity_summary` (``dicejax.influence.reciprocity`` is
    the pairwise ratio)."""
    warnings.warn("apps.contribution.reciprocity is deprecated; use reciprocity_summary",
                  DeprecationWarning, stacklevel=2)
    return reciprocity_summary(prox)


__all__ = [
    "Contribution",
    "Reciprocity",
    "contributions",
    "from_attribution",
    "reciprocity",
    "reciprocity_summary",
    "shares",
]
