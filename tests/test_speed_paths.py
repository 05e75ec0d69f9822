"""The fast paths of benchmarks/RESULTS.md §2 against slow, obviously correct twins.

* ``consensus_distance`` by a ``[1, n] × [n, P]`` product — against float64 numpy loops and
  the old ``jnp.mean(axis=0)`` formula, with and without padded nodes;
* ``_node_finite`` by a float row sum of ``x · 0`` — against ``np.isfinite`` per node, with
  NaN and ±inf planted in different nodes and leaves.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicejax.simulate import consensus_distance

sim = importlib.import_module("dicejax.simulate")


def _tree(n, rng, dtype=np.float64):
    return {"a": jnp.asarray(rng.normal(size=(n, 3, 2)).astype(dtype)),
            "b": jnp.asarray(rng.normal(size=(n,)).astype(dtype)),
            "c": jnp.asarray((rng.normal(size=(n, 4, 1, 2)) * 100).astype(dtype))}


# --------------------------------------------------------------------------------------------
# consensus distance
# --------------------------------------------------------------------------------------------


def _consensus_loop(tree, m):
    """float64 numpy, explicit loops over nodes and entries."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        x = np.asarray(x, np.float64).reshape(x.shape[0], -1)[:m]
        for p in range(x.shape[1]):
            mean = sum(x[k, p] for k in range(m)) / m
            total += sum((x[k, p] - mean) ** 2 for k in range(m))
    return total / m


def _consensus_old(tree):
    """The library's previous formula (a column reduction)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    sq = [jnp.sum((x - jnp.mean(x, axis=0, keepdims=True)) ** 2) for x in jax.tree.leaves(tree)]
    return sum(sq) / n


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_consensus_distance_equals_loop_and_old_formula(dtype, rng):
    tree = _tree(6, rng, dtype)
    want = _consensus_loop(tree, 6)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    got = jax.jit(consensus_distance)(tree)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol)
    np.testing.assert_allclose(consensus_distance(tree), _consensus_old(tree), rtol=tol)
    # a consensus has distance zero (up to the rounding of the average); one node alone too
    same = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), tree)
    assert float(consensus_distance(same)) <= 1e-24 if dtype == np.float64 else 1e-8
    assert float(consensus_distance(jax.tree.map(lambda x: x[:1], tree))) == 0.0


def test_consensus_distance_ignores_padded_nodes_whatever_they_hold(rng):
    tree = _tree(8, rng)
    want = _consensus_loop(tree, 5)
    padded = jax.tree.map(lambda x: x.at[5].set(jnp.nan).at[6].set(jnp.inf).at[7].set(1e300),
                          tree)
    got = jax.jit(consensus_distance, static_argnums=1)(padded, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(consensus_distance(tree, 8), _consensus_loop(tree, 8), rtol=1e-12)


def test_consensus_distance_is_differentiable(rng):
    x = jnp.asarray(rng.normal(size=(5, 3)))
    g = jax.grad(consensus_distance)(x)
    # d/dx_k of (1/n) Σ_k ||x_k − x̄||² is (2/n)(x_k − x̄)
    np.testing.assert_allclose(g, 2 / 5 * (x - x.mean(axis=0)), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# finiteness flags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_node_finite_flags_nan_and_inf_in_any_leaf(dtype, rng):
    tree = _tree(6, rng, dtype)
    tree["count"] = jnp.zeros((6, 2), jnp.int32)  # integer leaves are not checked
    big = float(np.finfo(dtype).max)
    tree["a"] = tree["a"].at[1, 2, 0].set(np.inf).at[4].set(big)  # huge but finite
    tree["b"] = tree["b"].at[3].set(np.nan)
    tree["c"] = tree["c"].at[5, 3, 0, 1].set(-np.inf)
    want = np.array([all(bool(np.all(np.isfinite(np.asarray(x[k]))))
                         for x in jax.tree.leaves(tree) if x.dtype != jnp.int32)
                     for k in range(6)])
    np.testing.assert_array_equal(want, [True, False, True, False, True, False])
    np.testing.assert_array_equal(jax.jit(sim._node_finite)(tree), want)
    clean = _tree(6, rng, dtype)
    assert bool(jnp.all(sim._node_finite(clean)))
