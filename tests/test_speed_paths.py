"""The fast paths of benchmarks/RESULTS.md §2 against slow, obviously correct twins.

* ``consensus_distance`` by a ``[1, n] × [n, P]`` product — against float64 numpy loops and
  the old ``jnp.mean(axis=0)`` formula, with and without padded nodes;
* ``_node_finite`` by a float row sum of ``x · 0`` — against ``np.isfinite`` per node, with
  NaN and ±inf planted in different nodes and leaves;
* ``gossip_sparse`` as per-leaf fused row gathers — against a double loop and the old
  concatenate + ``[n, D, P]`` gather + batched product, values and gradients.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dicejax as dj
from conftest import random_stochastic
from dicejax import mixing
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


# --------------------------------------------------------------------------------------------
# sparse gossip
# --------------------------------------------------------------------------------------------


def _gossip_loop(W, tree):
    n = W.shape[0]
    return jax.tree.map(
        lambda x: np.stack([sum(np.float64(W[k, j]) * np.asarray(x[j], np.float64)
                                for j in range(n)) for k in range(n)]), tree)


def _gossip_sparse_old(indices, weights, tree):
    """The library's previous kernel: one [n, P] buffer, a [n, D, P] gather, a batched product."""

    def mix(buf):
        gathered = jnp.take(buf, indices, axis=0, mode="fill", fill_value=0)
        return jnp.einsum("kd,kdp->kp", weights.astype(buf.dtype), gathered,
                          precision=jax.lax.Precision.HIGHEST)

    return mixing._flat_apply(mix, tree)


def _lists(W):
    """Padded in-neighbour lists and their weights, as the simulator builds them."""
    m = mixing.make_mixer(jnp.asarray(W)[None], dj.topology.from_matrix(W).neighbors.indices)
    return m.indices, m.weights[0]


@pytest.mark.parametrize("density", [0.15, 0.5])
def test_gossip_sparse_equals_double_loop_and_old_kernel(density, rng):
    n = 11
    W = random_stochastic(n, rng, density=density)
    indices, weights = _lists(W)
    assert int(jnp.max(indices)) == n  # irregular degrees: some slots are padding
    tree = dict(_tree(n, rng), f32=jnp.asarray(rng.normal(size=(n, 5)).astype(np.float32)))
    got = jax.jit(mixing.gossip_sparse)(indices, weights, tree)
    old = _gossip_sparse_old(indices, weights, tree)
    want = _gossip_loop(W, tree)
    for name in tree:
        assert got[name].dtype == tree[name].dtype and got[name].shape == tree[name].shape
        tol = 1e-6 if tree[name].dtype == jnp.float32 else 1e-13
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)
        np.testing.assert_allclose(got[name], old[name], rtol=tol, atol=tol)


def test_gossip_sparse_spreads_a_nan_only_to_out_neighbours(rng):
    n = 9
    W = np.asarray(dj.topology.ring(n).matrix)
    indices, weights = _lists(W)
    x = jnp.asarray(rng.normal(size=(n, 4))).at[3, 1].set(jnp.nan)
    out = mixing.gossip_sparse(indices, weights, x)
    np.testing.assert_array_equal(np.isnan(out).any(axis=1), W[:, 3] > 0)


def test_gossip_sparse_gradients_equal_old_kernel_and_dense(rng):
    n = 7
    W = random_stochastic(n, rng, density=0.4)
    indices, weights = _lists(W)
    tree = _tree(n, rng)
    probe = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)

    def f(w, x, kernel):
        out = kernel(indices, w, x)
        return sum(jnp.sum(jnp.sin(o) * p) for o, p in
                   zip(jax.tree.leaves(out), jax.tree.leaves(probe)))

    gw, gx = jax.grad(f, argnums=(0, 1))(weights, tree, mixing.gossip_sparse)
    gw_old, gx_old = jax.grad(f, argnums=(0, 1))(weights, tree, _gossip_sparse_old)
    np.testing.assert_allclose(gw, gw_old, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gx_old)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    def g_dense(M):
        out = mixing.gossip_dense(M, tree)
        return sum(jnp.sum(jnp.sin(o) * p) for o, p in
                   zip(jax.tree.leaves(out), jax.tree.leaves(probe)))

    gd = np.asarray(jax.grad(g_dense)(jnp.asarray(W)))
    idx = np.asarray(indices)
    for k in range(n):
        for d in range(idx.shape[1]):
            if idx[k, d] < n:
                np.testing.assert_allclose(gw[k, d], gd[k, idx[k, d]], rtol=1e-12)
            else:
                assert float(gw[k, d]) == 0.0  # a padded slot gathers zeros


def test_auto_picks_the_gather_kernel_for_exponential_graphs():
    for n in (16, 64, 256):
        topo = dj.topology.exponential(n)
        assert mixing.choose_method(n, topo.neighbors.indices.shape[1]) == "sparse"
    assert mixing.choose_method(16, 6) == "dense"  # D > n / 3
    assert mixing.choose_method(6, 2) == "dense"  # tiny graphs stay dense
