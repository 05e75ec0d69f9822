"""Tests for the adaptive attackers of dicejax.attacks, each against its definition as loops.

Partial label noise (:func:`attacks.label_noise`), intermittent attacks
(:func:`attacks.alternating_steps`, :func:`attacks.alternating_mask`) and per-step noise
scales (:func:`attacks.gaussian_noise` with ``std`` ``[T]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem
from dicejax import attacks
from dicejax import topology as tp

T, N, B, C = 6, 3, 20, 5


def make_batches(seed=0, T=T, n=N, B=B, shape=(2,), classes=C):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(T, n, B, *shape)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, classes, size=(T, n, B)), jnp.int32)}


MASK = attacks.attack_mask(T, N, nodes=[0, 2], steps=[1, 2, 4])


# ---------------------------------------------------------------------------------------------
# Partial label noise


def check_label_noise(y0, y1, mask, fraction, classes):
    """The definition, loop by loop: round(fraction B) wrong labels per masked batch."""
    Tn, n, Bn = y0.shape
    for t in range(Tn):
        for k in range(n):
            changed = [b for b in range(Bn) if y1[t, k, b] != y0[t, k, b]]
            if not mask[t, k]:
                assert changed == [], (t, k)
                continue
            assert len(changed) == round(fraction * Bn), (t, k)
            for b in range(Bn):
                assert 0 <= y1[t, k, b] < classes


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_label_noise_definition(fraction):
    batches = make_batches()
    out = jax.jit(attacks.label_noise(fraction, C))(batches, MASK, jax.random.PRNGKey(1))
    check_label_noise(np.asarray(batches["y"]), np.asarray(out["y"]), np.asarray(MASK),
                      fraction, C)
    np.testing.assert_array_equal(out["x"], batches["x"])
    assert out["y"].dtype == batches["y"].dtype
    if fraction == 0.0:
        np.testing.assert_array_equal(out["y"], batches["y"])
    if fraction == 1.0:  # every masked label wrong
        m = np.asarray(MASK)
        assert (np.asarray(out["y"])[m] != np.asarray(batches["y"])[m]).all()


def test_label_noise_rounds_like_python():
    """B = 10: 0.25 → round(2.5) = 2 (half to even), 0.35 → round(3.5) = 4, 0.04 → 0."""
    batches = make_batches(B=10)
    for fraction in (0.25, 0.35, 0.04, 0.06):
        out = attacks.label_noise(fraction, C)(batches, MASK, 3)
        check_label_noise(np.asarray(batches["y"]), np.asarray(out["y"]), np.asarray(MASK),
                          fraction, C)


def test_label_noise_is_seeded_and_independent_per_batch():
    # identical labels in every (t, k) batch: independent draws must still differ
    y = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32) % C, (T, N, B))
    batches = {"x": jnp.zeros((T, N, B, 1)), "y": y}
    everywhere = attacks.attack_mask(T, N, range(N))
    corrupt = attacks.label_noise(0.3, C)
    a = np.asarray(corrupt(batches, everywhere, 7)["y"])
    np.testing.assert_array_equal(a, corrupt(batches, everywhere, 7)["y"])
    np.testing.assert_array_equal(a, corrupt(batches, everywhere, jax.random.PRNGKey(7))["y"])
    assert (a != np.asarray(corrupt(batches, everywhere, 8)["y"])).any()
    changed = a != np.asarray(y)  # [T, N, B]: which positions each batch mislabelled
    patterns = {tuple(changed[t, k]) for t in range(T) for k in range(N)}
    assert len(patterns) > T * N // 2


def test_label_noise_is_uniform():
    """Each position is chosen with probability m / B; each wrong class is equally likely."""
    T2, B2, C2, fraction = 3000, 4, 4, 0.5  # m = 2 of 4
    batches = {"x": jnp.zeros((T2, 1, B2, 1)), "y": jnp.zeros((T2, 1, B2), jnp.int32)}
    out = np.asarray(attacks.label_noise(fraction, C2)(
        batches, attacks.attack_mask(T2, 1, [0]), 0)["y"])[:, 0]
    chosen = (out != 0).mean(axis=0)  # [B2]
    np.testing.assert_allclose(chosen, 0.5, atol=0.04)
    counts = np.bincount(out[out != 0], minlength=C2)[1:]  # wrong classes 1, 2, 3
    np.testing.assert_allclose(counts / counts.sum(), 1 / 3, atol=0.03)


def test_label_noise_narrow_dtype_does_not_overflow():
    classes = 120  # y + r reaches 238 > 127
    batches = {"x": jnp.zeros((T, N, B, 1)), "y": jnp.full((T, N, B), classes - 1, jnp.int8)}
    out = attacks.label_noise(1.0, classes)(batches, MASK, 0)
    assert out["y"].dtype == jnp.int8
    check_label_noise(np.asarray(batches["y"]), np.asarray(out["y"]), np.asarray(MASK),
                      1.0, classes)


def test_label_noise_by_name():
    batches = make_batches()
    a = attacks.corruption_by_name("label_noise", fraction=0.5, num_classes=C)(batches, MASK, 2)
    b = attacks.label_noise(0.5, C)(batches, MASK, 2)
    np.testing.assert_array_equal(a["y"], b["y"])
    assert "label_noise" in attacks.CORRUPTIONS


@pytest.mark.parametrize(("make", "name"), [
    (lambda: attacks.label_noise(-0.1, C), "fraction"),
    (lambda: attacks.label_noise(1.5, C), "fraction"),
    (lambda: attacks.label_noise(float("nan"), C), "fraction"),
    (lambda: attacks.label_noise(True, C), "fraction"),
    (lambda: attacks.label_noise("0.5", C), "fraction"),
    (lambda: attacks.label_noise(0.5, 1), "num_classes"),
    (lambda: attacks.label_noise(0.5, 2.0), "num_classes"),
    (lambda: attacks.label_noise(0.5, True), "num_classes"),
])
def test_label_noise_hyperparameters_validated(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_label_noise_inputs_validated():
    corrupt = attacks.label_noise(0.5, C)
    batches = make_batches()
    with pytest.raises(ValueError, match="mask"):
        corrupt(batches, MASK[:, :2], 0)
    with pytest.raises(ValueError, match="batches"):
        corrupt({**batches, "y": batches["y"].astype(jnp.float32)}, MASK, 0)
    with pytest.raises(ValueError, match="key"):
        corrupt(batches, MASK, "seed")


# ---------------------------------------------------------------------------------------------
# Intermittent attacks


def alternating_loop(T, on, off, phase):
    steps = []
    for t in range(T):
        position = (t - phase) % (on + off)  # Python's mod: non-negative
        if position < on:
            steps.append(t)
    return steps


@pytest.mark.parametrize(("on", "off", "phase"), [
    (1, 1, 0), (2, 3, 0), (2, 3, 4), (3, 1, -2), (1, 4, 17), (4, 0, 0), (5, 5, 2), (12, 1, 0),
])
def test_alternating_steps_and_mask_against_loops(on, off, phase):
    T2, n2, nodes = 11, 4, [1, 3]
    steps = attacks.alternating_steps(T2, on, off, phase)
    assert list(steps) == alternating_loop(T2, on, off, phase)
    assert isinstance(steps, tuple) and all(type(s) is int for s in steps)
    mask = np.asarray(attacks.alternating_mask(T2, n2, nodes, on, off, phase))
    assert mask.shape == (T2, n2) and mask.dtype == bool
    for t in range(T2):
        for k in range(n2):
            assert mask[t, k] == (k in nodes and t in steps), (t, k)
    np.testing.assert_array_equal(mask, attacks.attack_mask(T2, n2, nodes, steps=steps))


def test_alternating_steps_gate_updates_and_corruptions():
    steps = attacks.alternating_steps(T, on=2, off=1, phase=1)
    assert steps == (1, 2, 4, 5)
    assert steps == tuple(alternating_loop(T, 2, 1, 1))
    mask = np.asarray(attacks.alternating_mask(T, N, [1], 2, 1, 1))
    gates = np.asarray(attacks.sign_flip(T, N, [1], steps=steps))
    np.testing.assert_array_equal(gates, np.where(mask, -1.0, 1.0))
    np.testing.assert_array_equal(attacks.free_rider(T, N, [1], steps=steps),
                                  np.where(mask, 0.0, 1.0))
    batches = make_batches()
    spec = attacks.AttackSpec(attacks.label_permutation(), nodes=(1,), steps=steps)
    np.testing.assert_array_equal(spec.mask(T, N), mask)
    out = np.asarray(spec.apply(batches, 0)["y"])
    y = np.asarray(batches["y"])
    diff = (out != y).any(axis=-1)
    assert not diff[~mask].any() and diff[mask].all()


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(T=0, on=1, off=1), "T"),
    (dict(T=T, on=0, off=1), "on"),
    (dict(T=T, on=1.5, off=1), "on"),
    (dict(T=T, on=1, off=-1), "off"),
    (dict(T=T, on=1, off=None), "off"),
    (dict(T=T, on=1, off=1, phase=0.5), "phase"),
    (dict(T=T, on=1, off=1, phase=True), "phase"),
])
def test_alternating_steps_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        attacks.alternating_steps(**kwargs)


def test_alternating_mask_validated():
    with pytest.raises(ValueError, match="nodes"):
        attacks.alternating_mask(T, N, [N], 1, 1)
    with pytest.raises(ValueError, match="on"):
        attacks.alternating_mask(T, N, [0], 0, 1)


# ---------------------------------------------------------------------------------------------
# Per-step noise scale


STDS = np.array([0.1, 0.5, 1.0, 3.0, 10.0, 100.0])


def test_gaussian_noise_schedule_equals_scalar_noise_step_by_step():
    """Step t of the schedule is bit-for-bit gaussian_noise(std[t]) with the same key."""
    batches = make_batches()
    key = jax.random.PRNGKey(4)
    out = np.asarray(attacks.gaussian_noise(STDS)(batches, MASK, key)["x"])
    m = np.asarray(MASK)
    x = np.asarray(batches["x"])
    for t in range(T):
        single = np.asarray(attacks.gaussian_noise(float(STDS[t]))(batches, MASK, key)["x"])
        np.testing.assert_array_equal(out[t], single[t])
        for k in range(N):
            if not m[t, k]:
                np.testing.assert_array_equal(out[t, k], x[t, k])
    # a constant schedule is the scalar attack, and a list works like an array
    np.testing.assert_array_equal(attacks.gaussian_noise([2.0] * T)(batches, MASK, key)["x"],
                                  attacks.gaussian_noise(2.0)(batches, MASK, key)["x"])


def test_gaussian_noise_schedule_empirical_std():
    B2 = 4096
    batches = make_batches(B=B2, shape=(3,), n=2)
    mask = attacks.attack_mask(T, 2, [1])
    out = attacks.gaussian_noise(STDS)(batches, mask, 0)
    noise = np.asarray(out["x"], np.float64) - np.asarray(batches["x"], np.float64)
    for t in range(T):
        assert not noise[t, 0].any()
        assert noise[t, 1].std() == pytest.approx(STDS[t], rel=0.03), t
        assert abs(noise[t, 1].mean()) < 0.05 * STDS[t]


def test_gaussian_noise_schedule_by_name():
    batches = make_batches()
    a = attacks.corruption_by_name("gaussian_noise", std=STDS)(batches, MASK, 1)
    b = attacks.gaussian_noise(STDS)(batches, MASK, 1)
    np.testing.assert_array_equal(a["x"], b["x"])


@pytest.mark.parametrize("std", [
    np.array([1.0, 0.0]), np.array([1.0, -2.0]), np.array([1.0, np.nan]), np.array([np.inf]),
    np.ones((2, 3)), np.array([]), [True, True], "1.0", [1.0, "a"], None,
])
def test_gaussian_noise_schedule_validated(std):
    with pytest.raises(ValueError, match="std"):
        attacks.gaussian_noise(std)


def test_gaussian_noise_schedule_length_checked_at_corrupt_time():
    corrupt = attacks.gaussian_noise(STDS[:-1])
    with pytest.raises(ValueError, match="std"):
        corrupt(make_batches(), MASK, 0)


# ---------------------------------------------------------------------------------------------
# In a run


def test_label_noise_in_simulate_differs_only_from_first_attacked_step():
    T2, n2, first = 6, 4, 2
    loss, params, batches, _ = make_problem(n=n2, steps=T2, batch=8, classes=3)
    mask = attacks.alternating_mask(T2, n2, [1], on=2, off=2, phase=first)  # steps 2, 3
    assert attacks.alternating_steps(T2, 2, 2, first) == (2, 3)
    corrupted = attacks.label_noise(0.5, 3)(batches, mask, 0)
    topo, opt = tp.ring(n2), optax.sgd(0.1)
    clean = dj.simulate(loss, params, batches, topo, opt, record=True)
    attacked = dj.simulate(loss, params, corrupted, topo, opt, record=True)
    w_clean, w_attacked = np.asarray(clean.params["w"]), np.asarray(attacked.params["w"])
    np.testing.assert_array_equal(w_attacked[:first + 1], w_clean[:first + 1])  # θ^0..θ^2
    h_clean, h_attacked = np.asarray(clean.half_params["w"]), np.asarray(attacked.half_params["w"])
    np.testing.assert_array_equal(h_attacked[:first], h_clean[:first])
    # at the first attacked step only the attacker's own half-step changes ...
    assert (h_attacked[first, 1] != h_clean[first, 1]).any()
    np.testing.assert_array_equal(h_attacked[first, [0, 2, 3]], h_clean[first, [0, 2, 3]])
    # ... and gossip carries it to its ring neighbours 0 and 2, not yet to node 3
    changed = (w_attacked[first + 1] != w_clean[first + 1]).reshape(n2, -1).any(axis=1)
    np.testing.assert_array_equal(changed, [True, True, True, False])
