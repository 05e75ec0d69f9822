"""Attacks on decentralized learning: corrupted batches and manipulated local updates.

Two kinds, both applied inside the jitted run, never as Python branches per node or step:

* **data attacks** corrupt chosen nodes' batches at chosen steps. A :data:`Corruption` is a
  pure function ``corrupt(batches, mask, key) -> batches`` on the stacked batch arrays
  ``{'x': [T, n, B, ...], 'y': [T, n, B]}``; entry ``(t, k)`` is replaced where the boolean
  ``mask`` ``[T, n]`` is true and left bit-for-bit unchanged elsewhere (``jnp.where``). The
  factories :func:`label_permutation` (the DICE paper's "label flipping": a node's labels are
  randomly permuted within its batch), :func:`label_flip` (every label set to one class),
  :func:`label_noise` (a chosen fraction of each batch's labels replaced by uniformly random
  *wrong* classes) and :func:`gaussian_noise` (i.i.d. Gaussian noise added to the inputs, with
  one standard deviation or one per step ``[T]``) build them. Corrupt the batches, then pass
  them to :func:`dicejax.simulate`.
* **update attacks** are gates on the local updates, ``update_scale`` ``[T, n]`` of
  :func:`dicejax.simulate`: :func:`scaled_updates` (scale ``s``), :func:`sign_flip`
  (``s = −1``) and :func:`free_rider` (``s = 0``: the node forwards what it receives without
  training). The gates are recorded in the trajectory, so influence re-runs reproduce them.

:func:`attack_mask` builds the ``[T, n]`` mask from node and step lists; an
:class:`AttackSpec` bundles a corruption with the nodes and steps it hits.

**Adaptive attackers** stay below a detector's radar by choosing when and how hard to attack:

* *intermittent*: :func:`alternating_steps` ``(T, on, off, phase)`` lists the steps of an
  attacker that is corrupt for ``on`` steps, honest for ``off`` steps, and so on (step ``t`` is
  attacked where ``(t − phase) mod (on + off) < on``); pass them as ``steps=`` to
  :func:`attack_mask`, :class:`AttackSpec` or any update gate (:func:`scaled_updates`,
  :func:`sign_flip`, :func:`free_rider`), or build the mask with :func:`alternating_mask`;
* *partial*: :func:`label_noise` ``(fraction, num_classes)`` mislabels only
  ``round(fraction · B)`` examples of each attacked batch;
* *scheduled*: :func:`gaussian_noise` with a per-step ``std`` ``[T]`` ramps its noise up or
  keeps it low.

Example::

    mask = attacks.attack_mask(T, n, nodes=[3])
    batches = attacks.label_permutation()(batches, mask, jax.random.PRNGKey(0))
    traj = dj.simulate(loss_fn, params, batches, topo,
                       update_scale=attacks.free_rider(T, n, nodes=[5]))

    # node 2 mislabels a quarter of its batch every other step, node 4 sign-flips 1 step in 5
    mask = attacks.alternating_mask(T, n, nodes=[2], on=1, off=1)
    batches = attacks.label_noise(0.25, num_classes=10)(batches, mask, 1)
    gates = attacks.sign_flip(T, n, [4], steps=attacks.alternating_steps(T, on=1, off=4))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Batches = dict[str, jax.Array]
Corruption = Callable[[Batches, jax.Array, Any], Batches]
"""``corrupt(batches, mask, key) -> batches``: ``batches`` ``{'x': [T, n, B, ...],
'y': [T, n, B]}``, ``mask`` ``[T, n]`` bool, ``key`` a PRNG key or an integer seed."""

IndexList = Sequence[int] | np.ndarray | range | None


# ---------------------------------------------------------------------------------------------
# Masks


def _check_size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _indices(values: IndexList, size: int, name: str) -> np.ndarray:
    """Validated integer indices in ``[0, size)`` (duplicates allowed, order irrelevant)."""
    if isinstance(values, int | np.integer) and not isinstance(values, bool):
        values = [values]
    try:
        arr = np.asarray(list(values))
    except TypeError as e:
        raise ValueError(f"{name}: must be a sequence of integers, got {values!r}") from e
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: must be a sequence of integers, got {values!r}")
    if arr.min() < 0 or arr.max() >= size:
        raise ValueError(f"{name}: indices must lie in [0, {size}), got {arr.tolist()}")
    return arr.astype(np.int64)


def attack_mask(T: int, n: int, nodes: IndexList, steps: IndexList = None) -> jax.Array:
    """Which (step, node) entries an attack hits.

    Args:
      T: number of steps.
      n: number of nodes.
      nodes: attacked node indices in ``[0, n)`` (may be empty: no attack).
      steps: attacked step indices in ``[0, T)``; ``None`` = every step.

    Returns:
      ``[T, n]`` bool, true at ``(t, k)`` for ``t`` in ``steps`` and ``k`` in ``nodes``.

    Raises:
      ValueError: naming ``T``, ``n``, ``nodes`` or ``steps`` when malformed or out of range.
    """
    T, n = _check_size(T, "T"), _check_size(n, "n")
    node_idx = _indices(nodes, n, "nodes")
    rows = np.ones(T, bool)
    if steps is not None:
        rows = np.zeros(T, bool)
        rows[_indices(steps, T, "steps")] = True
    cols = np.zeros(n, bool)
    cols[node_idx] = True
    return jnp.asarray(rows[:, None] & cols[None, :])


def _check_integer(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or \
            (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}: must be an integer{bound}, got {value!r}")
    return int(value)


def alternating_steps(T: int, on: int, off: int, phase: int = 0) -> tuple[int, ...]:
    """The steps of an intermittent attacker: ``on`` steps corrupt, ``off`` honest, repeating.

    Step ``t`` is attacked where ``(t − phase) mod (on + off) < on``, so the first attacked
    block starts at ``phase`` (and, the pattern being periodic, also ``phase − k (on + off)``
    for every ``k``). ``off = 0`` attacks every step.

    Args:
      T: number of steps.
      on: length of each attacked block of steps (positive).
      off: length of each honest block of steps (non-negative).
      phase: the step at which an attacked block starts (any integer; only its value modulo
        ``on + off`` matters).

    Returns:
      The attacked step indices in ``[0, T)``, increasing; pass them as ``steps=`` to
      :func:`attack_mask`, :class:`AttackSpec`, :func:`scaled_updates`, :func:`sign_flip` or
      :func:`free_rider`.

    Raises:
      ValueError: naming ``T``, ``on``, ``off`` or ``phase`` when malformed.
    """
    T = _check_size(T, "T")
    on = _check_integer(on, "on", minimum=1)
    off = _check_integer(off, "off", minimum=0)
    phase = _check_integer(phase, "phase")
    t = np.arange(T)
    return tuple(int(s) for s in t[(t - phase) % (on + off) < on])


def alternating_mask(T: int, n: int, nodes: IndexList, on: int, off: int,
                     phase: int = 0) -> jax.Array:
    """``[T, n]`` mask of an intermittent attack: the ``nodes`` at :func:`alternating_steps`.

    Args:
      T: number of steps.
      n: number of nodes.
      nodes: attacked node indices in ``[0, n)``.
      on: length of each attacked block of steps (positive).
      off: length of each honest block of steps (non-negative).
      phase: the step at which an attacked block starts.

    Returns:
      ``[T, n]`` bool, true at ``(t, k)`` for ``k`` in ``nodes`` and
      ``(t − phase) mod (on + off) < on``.

    Raises:
      ValueError: naming ``T``, ``n``, ``nodes``, ``on``, ``off`` or ``phase``.
    """
    return attack_mask(T, n, nodes, alternating_steps(T, on, off, phase))


class AttackSpec(NamedTuple):
    """A data attack: a corruption and the (step, node) entries it hits.

    Attributes:
      corruption: a :data:`Corruption` (from :func:`label_permutation`, :func:`label_flip`,
        :func:`label_noise`, :func:`gaussian_noise`).
      nodes: attacked node indices.
      steps: attacked step indices, or ``None`` for every step (e.g. from
        :func:`alternating_steps`).
    """

    corruption: Corruption
    nodes: tuple[int, ...]
    steps: tuple[int, ...] | None = None

    def mask(self, T: int, n: int) -> jax.Array:
        """``[T, n]`` bool mask (see :func:`attack_mask`)."""
        return attack_mask(T, n, self.nodes, self.steps)

    def apply(self, batches: Batches, key: Any = 0) -> Batches:
        """The corrupted batches; ``T`` and ``n`` are read from ``batches['y']``."""
        T, n = _check_batches(batches)
        return self.corruption(batches, self.mask(T, n), key)


# ---------------------------------------------------------------------------------------------
# Data attacks


def _check_batches(batches: Any) -> tuple[int, int]:
    if not isinstance(batches, dict) or "x" not in batches or "y" not in batches:
        raise ValueError("batches: must be a dict with keys 'x' [T, n, B, ...] and 'y' [T, n, B]")
    ys, xs = jnp.shape(batches["y"]), jnp.shape(batches["x"])
    if len(ys) != 3:
        raise ValueError(f"batches: 'y' must be [T, n, B], got shape {ys}")
    if xs[:3] != ys:
        raise ValueError(f"batches: 'x' {xs} and 'y' {ys} disagree on the axes [T, n, B]")
    return int(ys[0]), int(ys[1])


def _check_mask(mask: Any, T: int, n: int) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.shape != (T, n):
        raise ValueError(f"mask: must have shape [T, n] = {(T, n)}, got {mask.shape}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask: must be boolean, got dtype {mask.dtype}")
    return mask


def _key(key: Any) -> jax.Array:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,):
            return key
        if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):  # a (traced) seed
            return jax.random.PRNGKey(key)
    raise ValueError(f"key: must be a PRNG key or an integer seed, got {key!r}")


def _where(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    m = mask.reshape(mask.shape + (1,) * (old.ndim - 2))
    return jnp.where(m, new, old)


def label_permutation() -> Corruption:
    """The DICE paper's label flipping: labels randomly permuted within each masked batch.

    Each masked ``(t, k)`` batch gets its own uniformly random permutation of its ``B``
    labels (images untouched), so the batch's label multiset, and hence the node's label
    distribution, is unchanged while the image-label pairing is destroyed.

    Returns:
      A :data:`Corruption`; the permutations are a deterministic function of ``key``.
    """

    def corrupt(batches: Batches, mask: jax.Array, key: Any) -> Batches:
        T, n = _check_batches(batches)
        mask = _check_mask(mask, T, n)
        y = jnp.asarray(batches["y"])
        order = jnp.argsort(jax.random.uniform(_key(key), y.shape), axis=-1)
        permuted = jnp.take_along_axis(y, order, axis=-1)
        return {**batches, "y": _where(mask, permuted, y)}

    return corrupt


def label_flip(target: int) -> Corruption:
    """Every label of each masked batch set to the class ``target``.

    Args:
      target: the class index (a non-negative integer, below the number of classes).

    Returns:
      A :data:`Corruption` (``key`` is unused).
    """
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or target < 0:
        raise ValueError(f"target: must be a non-negative integer class index, got {target!r}")
    target = int(target)

    def corrupt(batches: Batches, mask: jax.Array, key: Any = None) -> Batches:
        del key
        T, n = _check_batches(batches)
        mask = _check_mask(mask, T, n)
        y = jnp.asarray(batches["y"])
        return {**batches, "y": _where(mask, jnp.full_like(y, target), y)}

    return corrupt


def label_noise(fraction: float, num_classes: int) -> Corruption:
    """Symmetric label noise: a fixed fraction of each masked batch's labels made wrong.

    In each masked ``(t, k)`` batch of ``B`` labels, exactly ``m = round(fraction · B)``
    positions (Python's ``round``: halves to even) are chosen uniformly at random, and each
    chosen label ``y`` becomes ``(y + r) mod num_classes`` with ``r`` uniform in
    ``1 .. num_classes − 1``, i.e. a uniformly random *different* class. Other positions,
    the inputs and unmasked batches are left bit-for-bit unchanged. ``fraction = 0`` changes
    nothing; ``fraction = 1`` makes every label of a masked batch wrong. Unlike
    :func:`label_permutation` this changes the node's label distribution and lets an attacker
    corrupt only part of its batch.

    Args:
      fraction: share of each masked batch to mislabel, in ``[0, 1]``.
      num_classes: number of classes (an integer ``>= 2``); labels must lie in
        ``[0, num_classes)``.

    Returns:
      A :data:`Corruption`; the chosen positions and new labels are a deterministic function
      of ``key``, drawn independently for every ``(t, k)``.

    Raises:
      ValueError: naming ``fraction`` or ``num_classes`` when out of range; at corrupt time
        naming ``batches`` when ``'y'`` is not integer.
    """
    if isinstance(fraction, bool) or \
            not isinstance(fraction, int | float | np.floating | np.integer) or \
            not (np.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"fraction: must be a number in [0, 1], got {fraction!r}")
    fraction = float(fraction)
    num_classes = _check_integer(num_classes, "num_classes", minimum=2)

    def corrupt(batches: Batches, mask: jax.Array, key: Any) -> Batches:
        T, n = _check_batches(batches)
        mask = _check_mask(mask, T, n)
        y = jnp.asarray(batches["y"])
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"batches: 'y' must be integer class labels, got {y.dtype}")
        num_wrong = round(fraction * y.shape[-1])
        position_key, offset_key = jax.random.split(_key(key))
        # rank of each position in a uniformly random order of its batch: the num_wrong
        # lowest ranks are a uniformly random subset of exactly num_wrong positions
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(position_key, y.shape), axis=-1),
                           axis=-1)
        wide = jnp.promote_types(y.dtype, jnp.int32)  # y + r must not overflow a narrow dtype
        offset = jax.random.randint(offset_key, y.shape, 1, num_classes, dtype=wide)
        wrong = ((y.astype(wide) + offset) % num_classes).astype(y.dtype)
        noisy = jnp.where(rank < num_wrong, wrong, y)
        return {**batches, "y": _where(mask, noisy, y)}

    return corrupt


def gaussian_noise(std: float | Sequence[float] | np.ndarray | jax.Array) -> Corruption:
    """I.i.d. Gaussian noise ``N(0, std²)`` added to every input entry of each masked batch.

    The DICE paper states a variance of 100, i.e. ``std = 10``, on normalised inputs (unit
    variance per channel), so the signal is buried. Labels are untouched. A per-step ``std``
    ``[T]`` gives step ``t`` the noise scale ``std[t]`` (an attacker ramping its noise, or
    keeping it low); the draws are those of a scalar ``std``, scaled per step, so step ``t``
    gets the noise ``gaussian_noise(std[t])`` gives it with the same ``key`` (bit for bit when
    both run eagerly; under ``jit`` the compiler may fuse the scaling differently by an ulp).

    Args:
      std: noise standard deviation (positive, finite), in units of the normalised inputs:
        one number, or one per step ``[T]``.

    Returns:
      A :data:`Corruption`; the noise is a deterministic function of ``key``.

    Raises:
      ValueError: naming ``std`` when not positive and finite or not a scalar or ``[T]``,
        and at corrupt time when its length differs from the batches' ``T``.
    """
    if isinstance(std, bool) or isinstance(std, str):
        raise ValueError(f"std: must be a positive finite number or a [T] array, got {std!r}")
    try:
        stds = np.asarray(std)
    except (TypeError, ValueError) as e:
        raise ValueError(f"std: must be a positive finite number or a [T] array, got {std!r}") \
            from e
    if stds.ndim > 1 or stds.size == 0 or stds.dtype == bool or \
            not (np.issubdtype(stds.dtype, np.integer) or np.issubdtype(stds.dtype, np.floating)) \
            or not (np.isfinite(stds).all() and (stds > 0).all()):
        raise ValueError(f"std: must be a positive finite number or a [T] array of them, "
                         f"got {std!r}")
    stds = stds.astype(np.float64)

    def corrupt(batches: Batches, mask: jax.Array, key: Any) -> Batches:
        T, n = _check_batches(batches)
        mask = _check_mask(mask, T, n)
        x = jnp.asarray(batches["x"])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"batches: 'x' must be floating point for noise, got {x.dtype}")
        if stds.ndim == 1 and stds.shape[0] != T:
            raise ValueError(f"std: has {stds.shape[0]} steps but the batches have T = {T}")
        scale = jnp.asarray(stds, x.dtype).reshape(stds.shape + (1,) * (x.ndim - stds.ndim))
        noise = jax.random.normal(_key(key), x.shape, x.dtype) * scale
        return {**batches, "x": _where(mask, x + noise, x)}

    return corrupt


CORRUPTIONS: dict[str, Callable[..., Corruption]] = {
    "label_permutation": label_permutation,
    "label_flip": label_flip,
    "label_noise": label_noise,
    "gaussian_noise": gaussian_noise,
}


def corruption_by_name(name: str, **kwargs: Any) -> Corruption:
    """A corruption from :data:`CORRUPTIONS` with its factory's keyword arguments.

    ``label_permutation``, ``label_flip`` (``target=``), ``label_noise`` (``fraction=``,
    ``num_classes=``) or ``gaussian_noise`` (``std=``, a number or one per step).
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"name: unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Update attacks (gates for simulate's update_scale)


def scaled_updates(T: int, n: int, nodes: IndexList, scale: float,
                   steps: IndexList = None, dtype: Any = None) -> jax.Array:
    """Gates ``update_scale`` ``[T, n]``: ``scale`` at the attacked entries, 1 elsewhere.

    The attacked node's half-step becomes ``θ + scale · (θ^{t+½} − θ)``, see
    :func:`dicejax.simulate.gate`.

    Args:
      T: number of steps.
      n: number of nodes.
      nodes: attacked node indices.
      scale: the gate (finite), e.g. 10 for a boosted update.
      steps: attacked steps (``None`` = all), e.g. :func:`alternating_steps` for an
        intermittent attacker.
      dtype: float dtype of the gates (default: JAX's default float).

    Returns:
      ``[T, n]`` floats for ``dicejax.simulate(..., update_scale=...)``.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.floating | np.integer) \
            or not np.isfinite(scale):
        raise ValueError(f"scale: must be a finite number, got {scale!r}")
    mask = attack_mask(T, n, nodes, steps)
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jnp.where(mask, jnp.asarray(scale, dtype), jnp.asarray(1, dtype))


def sign_flip(T: int, n: int, nodes: IndexList, steps: IndexList = None,
              dtype: Any = None) -> jax.Array:
    """Gates that flip the sign of the attacked nodes' updates (``scale = −1``)."""
    return scaled_updates(T, n, nodes, -1.0, steps, dtype)


def free_rider(T: int, n: int, nodes: IndexList, steps: IndexList = None,
               dtype: Any = None) -> jax.Array:
    """Gates of free-riders (``scale = 0``): they forward what they receive without training."""
    return scaled_updates(T, n, nodes, 0.0, steps, dtype)


UPDATE_ATTACKS: dict[str, Callable[..., jax.Array]] = {
    "sign_flip": sign_flip,
    "free_rider": free_rider,
}


__all__ = [
    "CORRUPTIONS",
    "UPDATE_ATTACKS",
    "AttackSpec",
    "Corruption",
    "alternating_mask",
    "alternating_steps",
    "attack_mask",
    "corruption_by_name",
    "free_rider",
    "gaussian_noise",
    "label_flip",
    "label_noise",
    "label_permutation",
    "scaled_updates",
    "sign_flip",
]
