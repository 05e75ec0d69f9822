"""Tests for dicejax.attacks: masks, batch corruptions and update gates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_problem
from dicejax import attacks
from dicejax import topology as tp
from dicejax.simulate import simulate

T, N, B = 5, 4, 32


def make_batches(seed=0, T=T, n=N, B=B, shape=(3, 3, 1)):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(T, n, B, *shape)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 10, size=(T, n, B)), jnp.int32)}


MASK = attacks.attack_mask(T, N, nodes=[1, 3], steps=[0, 2, 4])


# ---------------------------------------------------------------------------------------------
# Masks


def test_attack_mask_entries():
    m = np.asarray(MASK)
    assert m.shape == (T, N) and m.dtype == bool
    expected = np.zeros((T, N), bool)
    for t in (0, 2, 4):
        expected[t, [1, 3]] = True
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(attacks.attack_mask(T, N, [2]), np.eye(N, dtype=bool)[[2] * T])
    assert not np.asarray(attacks.attack_mask(T, N, [])).any()
    np.testing.assert_array_equal(attacks.attack_mask(T, N, 2, steps=range(1, 3))[:, 2],
                                  [False, True, True, False, False])


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(T=0, n=N, nodes=[0]), "T"),
    (dict(T=T, n=-1, nodes=[0]), "n"),
    (dict(T=T, n=N, nodes=[N]), "nodes"),
    (dict(T=T, n=N, nodes=[-1]), "nodes"),
    (dict(T=T, n=N, nodes=[0.5]), "nodes"),
    (dict(T=T, n=N, nodes=[0], steps=[T]), "steps"),
    (dict(T=T, n=N, nodes=[0], steps=["a"]), "steps"),
])
def test_attack_mask_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        attacks.attack_mask(**kwargs)


# ---------------------------------------------------------------------------------------------
# Data attacks


def changed(a, b):
    """[T, n] bool: which (step, node) batches differ."""
    a, b = np.asarray(a), np.asarray(b)
    return (a != b).reshape(a.shape[0], a.shape[1], -1).any(axis=-1)


def test_label_permutation_only_masked_and_keeps_multiset():
    batches = make_batches()
    out = jax.jit(attacks.label_permutation())(batches, MASK, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(out["x"], batches["x"])  # images untouched
    diff = changed(out["y"], batches["y"])
    assert not diff[~np.asarray(MASK)].any()  # unmasked labels bit-for-bit equal
    assert diff[np.asarray(MASK)].all()  # every masked batch of 32 labels is re-paired
    np.testing.assert_array_equal(np.sort(out["y"], axis=-1), np.sort(batches["y"], axis=-1))
    assert out["y"].dtype == batches["y"].dtype


def test_label_permutation_is_seeded():
    batches = make_batches()
    corrupt = attacks.label_permutation()
    a = corrupt(batches, MASK, 7)
    np.testing.assert_array_equal(a["y"], corrupt(batches, MASK, 7)["y"])
    np.testing.assert_array_equal(a["y"], corrupt(batches, MASK, jax.random.PRNGKey(7))["y"])
    assert (np.asarray(a["y"]) != np.asarray(corrupt(batches, MASK, 8)["y"])).any()


def test_label_permutation_is_uniform_over_positions():
    """Where a label lands is uniform: label at position 0 ends anywhere equally often."""
    T2, B2 = 400, 4
    y = jnp.broadcast_to(jnp.arange(B2, dtype=jnp.int32), (T2, 1, B2))
    batches = {"x": jnp.zeros((T2, 1, B2, 1)), "y": y}
    out = attacks.label_permutation()(batches, attacks.attack_mask(T2, 1, [0]), 0)
    counts = np.bincount(np.argmax(np.asarray(out["y"])[:, 0] == 0, axis=-1), minlength=B2)
    assert counts.min() > 0.7 * T2 / B2 and counts.max() < 1.3 * T2 / B2


def test_label_flip():
    batches = make_batches()
    out = jax.jit(attacks.label_flip(7))(batches, MASK, None)
    m = np.asarray(MASK)
    assert (np.asarray(out["y"])[m] == 7).all()
    np.testing.assert_array_equal(np.asarray(out["y"])[~m], np.asarray(batches["y"])[~m])
    np.testing.assert_array_equal(out["x"], batches["x"])


def test_gaussian_noise_std_and_mask():
    batches = make_batches(B=64, shape=(8, 8, 1))
    out = jax.jit(attacks.gaussian_noise(10.0))(batches, MASK, jax.random.PRNGKey(0))
    m = np.asarray(MASK)
    noise = (np.asarray(out["x"], np.float64) - np.asarray(batches["x"], np.float64))
    assert not noise[~m].any()  # unmasked inputs bit-for-bit equal
    masked = noise[m]  # [6, 64, 8, 8, 1]: 24,576 draws
    assert masked.std() == pytest.approx(10.0, rel=0.02)
    assert abs(masked.mean()) < 0.2
    per_batch = masked.reshape(masked.shape[0], -1).std(axis=1)
    np.testing.assert_allclose(per_batch, 10.0, rtol=0.06)
    np.testing.assert_array_equal(out["y"], batches["y"])
    assert out["x"].dtype == batches["x"].dtype


def test_attack_spec_apply_matches_mask():
    batches = make_batches()
    spec = attacks.AttackSpec(attacks.gaussian_noise(1.0), nodes=(1, 3), steps=(0, 2, 4))
    np.testing.assert_array_equal(spec.mask(T, N), MASK)
    a = spec.apply(batches, 5)
    b = attacks.gaussian_noise(1.0)(batches, MASK, 5)
    np.testing.assert_array_equal(a["x"], b["x"])


def test_corruptions_by_name():
    assert set(attacks.CORRUPTIONS) == {"label_permutation", "label_flip", "label_noise",
                                        "gaussian_noise"}
    out = attacks.corruption_by_name("label_flip", target=2)(make_batches(), MASK, None)
    assert (np.asarray(out["y"])[np.asarray(MASK)] == 2).all()
    with pytest.raises(ValueError, match="name"):
        attacks.corruption_by_name("backdoor")


@pytest.mark.parametrize(("make", "name"), [
    (lambda: attacks.gaussian_noise(0.0), "std"),
    (lambda: attacks.gaussian_noise(float("nan")), "std"),
    (lambda: attacks.gaussian_noise(-1), "std"),
    (lambda: attacks.label_flip(-1), "target"),
    (lambda: attacks.label_flip(1.5), "target"),
])
def test_corruption_hyperparameters_validated(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("corrupt", [attacks.label_permutation(), attacks.label_flip(0),
                                     attacks.gaussian_noise(1.0)])
def test_corruption_inputs_validated(corrupt):
    batches = make_batches()
    with pytest.raises(ValueError, match="mask"):
        corrupt(batches, MASK[:, :2], 0)
    with pytest.raises(ValueError, match="mask"):
        corrupt(batches, MASK.astype(jnp.int32), 0)
    with pytest.raises(ValueError, match="batches"):
        corrupt({"x": batches["x"]}, MASK, 0)
    with pytest.raises(ValueError, match="batches"):
        corrupt({"x": batches["x"][:, :, :3], "y": batches["y"]}, MASK, 0)


def test_bad_key():
    with pytest.raises(ValueError, match="key"):
        attacks.label_permutation()(make_batches(), MASK, "seed")


# ---------------------------------------------------------------------------------------------
# Update attacks


def test_gates():
    g = attacks.scaled_updates(T, N, [2], 10.0, steps=[1])
    assert g.shape == (T, N)
    expected = np.ones((T, N))
    expected[1, 2] = 10.0
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_array_equal(attacks.sign_flip(T, N, [0, 3]),
                                  np.where(np.isin(np.arange(N), [0, 3]), -1.0, 1.0)[None]
                                  .repeat(T, 0))
    np.testing.assert_array_equal(attacks.free_rider(T, N, [1])[:, 1], np.zeros(T))
    np.testing.assert_array_equal(attacks.free_rider(T, N, [1])[:, [0, 2, 3]], 1.0)
    assert attacks.free_rider(T, N, [1], dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="scale"):
        attacks.scaled_updates(T, N, [1], float("inf"))
    with pytest.raises(ValueError, match="nodes"):
        attacks.sign_flip(T, N, [N])


def test_gates_in_simulate():
    """Free-rider: zero update; sign flip: the exact negative of the honest update."""
    loss, params, batches, _ = make_problem(n=N, steps=T)
    topo = tp.ring(N)
    opt = optax.sgd(0.1)
    honest = simulate(loss, params, batches, topo, opt, record=True)
    gates = attacks.free_rider(T, N, [1]) * attacks.sign_flip(T, N, [2])
    run = simulate(loss, params, batches, topo, opt, record=True, update_scale=gates)
    v = np.asarray(run.half_params["w"] - run.params["w"][:-1])
    assert not v[:, 1].any()
    # at step 0 every node starts from the same params in both runs
    v0 = np.asarray(honest.half_params["w"][0] - honest.params["w"][0])
    np.testing.assert_allclose(v[0, 2], -v0[2], rtol=1e-12)
    np.testing.assert_allclose(v[0, [0, 3]], v0[[0, 3]], rtol=1e-12)
    np.testing.assert_array_equal(run.update_scale, gates)
