"""Gossip kernels: dense contraction and sparse neighbour gather agree with a double loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dicejax as dj
from conftest import random_stochastic
from dicejax import mixing


def _tree(n, rng):
    return {"a": jnp.asarray(rng.normal(size=(n, 3, 2))),
            "b": jnp.asarray(rng.normal(size=(n,))),
            "c": jnp.asarray(rng.normal(size=(n, 4)).astype(np.float32))}


def _loop(W, tree):
    n = W.shape[0]
    return jax.tree.map(
        lambda x: jnp.stack([sum(W[k, j] * x[j] for j in range(n)) for k in range(n)]).astype(
            x.dtype), tree)


@pytest.mark.parametrize("density", [0.15, 0.6])
def test_dense_and_sparse_equal_double_loop(density, rng):
    n = 9
    W = random_stochastic(n, rng, density=density)
    tree = _tree(n, rng)
    topo = dj.topology.from_matrix(W)
    expect = _loop(W, tree)
    dense = mixing.gossip_dense(jnp.asarray(W), tree)
    m = mixing.make_mixer(jnp.asarray(W)[None], topo.neighbors.indices)
    sparse = m.apply(0, tree)
    for name in tree:
        assert dense[name].dtype == tree[name].dtype == sparse[name].dtype
        tol = 1e-6 if tree[name].dtype == jnp.float32 else 1e-13
        np.testing.assert_allclose(dense[name], expect[name], rtol=tol, atol=tol)
        np.testing.assert_allclose(sparse[name], expect[name], rtol=tol, atol=tol)


def _gossip_dense_one_buffer(W, tree):
    """The kernel ``gossip_dense`` replaced: all leaves of a dtype in one ``[n, P]`` buffer."""
    return mixing.flat_apply(
        lambda buf: jnp.matmul(W.astype(buf.dtype), buf, precision=jax.lax.Precision.HIGHEST),
        tree)


def test_dense_per_leaf_equals_one_buffer_kernel_values_and_gradients(rng):
    n = 7
    W = jnp.asarray(random_stochastic(n, rng, density=0.5))
    tree = {k: v.astype(jnp.float64) for k, v in _tree(n, rng).items()}
    probe = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)

    def objective(kernel):
        def f(M, t):
            out = kernel(M, t)
            return sum(jnp.sum(jnp.sin(o) * p)
                       for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(probe)))
        return f

    new, old = mixing.gossip_dense(W, tree), _gossip_dense_one_buffer(W, tree)
    for name in tree:
        assert new[name].shape == old[name].shape
        np.testing.assert_allclose(new[name], old[name], rtol=1e-14, atol=1e-14)
    g_new = jax.grad(objective(mixing.gossip_dense), argnums=(0, 1))(W, tree)
    g_old = jax.grad(objective(_gossip_dense_one_buffer), argnums=(0, 1))(W, tree)
    np.testing.assert_allclose(g_new[0], g_old[0], rtol=1e-13, atol=1e-14)
    for a, b in zip(jax.tree.leaves(g_new[1]), jax.tree.leaves(g_old[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_periodic_mixer_uses_step_modulo_period(rng):
    n = 6
    Ws = random_stochastic(n, rng, steps=3)
    tree = _tree(n, rng)
    m = mixing.make_mixer(jnp.asarray(Ws), dj.topology.from_matrix(Ws).neighbors.indices)
    for t in (0, 4, 8):
        out = m.apply(jnp.asarray(t), tree)
        np.testing.assert_allclose(out["a"], _loop(Ws[t % 3], tree)["a"], atol=1e-13)


def test_sparse_weights_are_differentiable(rng):
    n = 5
    W = jnp.asarray(random_stochastic(n, rng, density=0.3))
    idx = dj.topology.from_matrix(np.asarray(W)).neighbors.indices
    x = jnp.asarray(rng.normal(size=(n, 3)))

    def f(W, method):
        m = mixing.make_mixer(W[None], idx if method == "sparse" else None)
        return jnp.sum(m.apply(0, x) ** 2)

    g_dense = jax.grad(f)(W, "dense")
    g_sparse = jax.grad(f)(W, "sparse")
    support = np.asarray(W) > 0
    np.testing.assert_allclose(np.where(support, g_sparse, 0), np.where(support, g_dense, 0),
                               rtol=1e-12)


def test_choose_method():
    # sparse (fused row gathers) once the padded degree is at most n / 8, from 8 nodes
    assert mixing.choose_method(16, 2) == "sparse"
    assert mixing.choose_method(16, 3) == "dense"
    assert mixing.choose_method(16, 5) == "dense"  # the 16-node exponential graph
    assert mixing.choose_method(64, 8) == "sparse"
    assert mixing.choose_method(64, 9) == "dense"
    assert mixing.choose_method(8, 1) == "sparse"
    assert mixing.choose_method(7, 1) == "dense"
    assert mixing.choose_method(1024, 11) == "sparse"
    assert mixing.choose_method(1024, 512) == "dense"
    assert mixing.choose_method(16, 5, "dense") == "dense"
    assert mixing.choose_method(16, 5, "sparse") == "sparse"
    with pytest.raises(ValueError, match="method"):
        mixing.choose_method(16, 5, "fastest")
