"""Shared fixtures: tiny float64 problems with a brute-force twin for every fast path."""

from __future__ import annotations

import os

# The tests compile many small programs whose run time is negligible: XLA's backend
# optimisations cost more than they save here (the reach-restricted cascade of an 8-node
# problem compiles in 9.5 s instead of 21 s). Set before jax starts its backend; the CLI
# subprocesses the tests start inherit it. Results agree to rounding (the tolerances).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# Many tests build equal programs from fresh closures (every `simulate` call, every CLI
# subprocess, both test workers): JAX's persistent cache is keyed on the compiled module,
# so each distinct program compiles once per cache. The cache lives beside the other pytest
# state (ignored by git); `DICEJAX_TEST_COMPILE_CACHE=0` turns it off, and a fresh clone
# starts with it empty (that is how the suite's time is measured).
if os.environ.get("DICEJAX_TEST_COMPILE_CACHE", "1") != "0":
    _cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          ".pytest_cache", "jax-compile")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def softmax_loss(params, batch):
    """Multinomial logistic regression, mean cross-entropy. Smooth (no ReLU kinks)."""
    logits = batch["x"] @ params["w"] + params["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def tanh_mlp_loss(params, batch):
    """A small two-layer tanh network (non-convex, smooth)."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def make_problem(n=5, steps=6, batch=3, dim=4, classes=3, seed=0, model="softmax", same_init=False):
    """Returns (loss_fn, params [n,...], batches [T,n,B,...], probe) in float64."""
    rng = np.random.default_rng(seed)
    if model == "softmax":
        loss = softmax_loss
        p = {"w": rng.normal(size=(n, dim, classes)) * 0.5, "b": rng.normal(size=(n, classes))}
    else:
        loss = tanh_mlp_loss
        h = 5
        p = {
            "w1": rng.normal(size=(n, dim, h)) * 0.7,
            "b1": rng.normal(size=(n, h)) * 0.1,
            "w2": rng.normal(size=(n, h, classes)) * 0.7,
            "b2": rng.normal(size=(n, classes)),
        }
    if same_init:
        p = {k: np.broadcast_to(v[:1], v.shape).copy() for k, v in p.items()}
    params = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
    batches = {
        "x": jnp.asarray(rng.normal(size=(steps, n, batch, dim))),
        "y": jnp.asarray(rng.integers(0, classes, size=(steps, n, batch))),
    }
    probe = {
        "x": jnp.asarray(rng.normal(size=(7, dim))),
        "y": jnp.asarray(rng.integers(0, classes, size=(7,))),
    }
    return loss, params, batches, probe


def random_stochastic(n, rng, steps=None, density=0.6):
    """Directed row-stochastic matrices (not doubly stochastic), self loops kept."""
    shape = (n, n) if steps is None else (steps, n, n)
    a = rng.uniform(size=shape) * (rng.uniform(size=shape) < density)
    a = a + np.eye(n) * 0.5
    return a / a.sum(-1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
