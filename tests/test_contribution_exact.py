"""Exact contributions (issue 16): leave-one-out, coalition values, Shapley and Banzhaf
values, each against its brute-force twin of separate ``dj.simulate`` runs."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem, random_stochastic
from dicejax.apps import contribution as ct
from dicejax.cli import main


def objective(loss, params, probe, q):
    """``Σ_k q_k L(θ_k; z')`` and the per-node losses ``[n]``."""
    losses = np.asarray(jax.vmap(loss, in_axes=(0, None))(params, probe))
    return float(q @ losses), losses


def node_slice(tree, keep, axis):
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(keep), axis=axis), tree)


@pytest.fixture(scope="module")
def five():
    """5 nodes, 6 steps, tanh MLP, momentum SGD (optimizer state), time-varying directed
    matrices, a free-rider (node 2, the run's own gate) and non-uniform q."""
    n, T = 5, 6
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh", seed=3)
    W = random_stochastic(n, np.random.default_rng(7), steps=T)  # [T, n, n]
    scale = np.ones((T, n))
    scale[:, 2] = 0.0
    opt = optax.sgd(0.3, momentum=0.5)
    traj = dj.simulate(loss, params, batches, W, optimizer=opt, update_scale=scale)
    q = np.array([0.1, 0.3, 0.2, 0.15, 0.25])
    return dict(n=n, T=T, loss=loss, params=params, batches=batches, probe=probe, W=W,
                scale=scale, opt=opt, traj=traj, q=q)


def test_leave_one_out_data_mode_equals_separate_runs(five):
    p = five
    n, loss, probe, q = p["n"], p["loss"], p["probe"], p["q"]

    def run(scale):
        tr = dj.simulate(loss, p["params"], p["batches"], p["W"], optimizer=p["opt"],
                         update_scale=scale)  # the fixture's run compiled it
        return objective(loss, tr.final_params, probe, q)

    full, full_k = run(p["scale"])
    twin, twin_obs = np.empty(n), np.empty((n, n))
    for j in range(n):  # j's updates gated to 0 at every step, on top of the run's gates
        scale = p["scale"].copy()
        scale[:, j] = 0.0
        v, losses = run(scale)
        twin[j], twin_obs[:, j] = full - v, full_k - losses
    # chunks of 4 re-runs (6 padded to 8, one lax.map); the unchunked path runs below
    out = ct.leave_one_out(loss, p["traj"], probe, node_weights=q, observers=True,
                           batch_size=4)
    np.testing.assert_allclose(out.values, twin, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.per_observer, twin_obs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.full, full_k, rtol=0, atol=1e-10)
    assert out.values[2] == 0.0  # the free-rider's gate has no effect
    np.testing.assert_allclose(q @ out.per_observer, out.values, atol=1e-15)


def test_leave_one_out_node_mode_equals_runs_without_the_node(five):
    """``mode="node"``: the n − 1 other nodes on the renormalised submatrices of every step,
    scored on the q-weighted (renormalised) loss of those nodes."""
    p = five
    n, loss, probe, q, W = p["n"], p["loss"], p["probe"], p["q"], p["W"]
    _, full_k = objective(loss, p["traj"].final_params, probe, q)
    twin, twin_obs = np.empty(n), np.zeros((n, n))
    for j in range(n):
        keep = [k for k in range(n) if k != j]
        sub = W[:, keep][:, :, keep]
        sub = sub / sub.sum(-1, keepdims=True)
        r = dj.simulate(loss, node_slice(p["params"], keep, 0),
                        node_slice(p["batches"], keep, 1), sub, optimizer=p["opt"],
                        update_scale=p["scale"][:, keep], record=False)
        qk = q[keep] / q[keep].sum()
        _, losses = objective(loss, r.final_params, probe, qk)
        twin[j] = qk @ (full_k[keep] - losses)
        twin_obs[keep, j] = full_k[keep] - losses
    out = ct.leave_one_out(loss, p["traj"], probe, mode="node", node_weights=q,
                           observers=True)
    np.testing.assert_allclose(out.values, twin, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.per_observer, twin_obs, rtol=0, atol=1e-10)


def test_without_node_rows_and_columns():
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    out = np.asarray(ct.without_node(jnp.asarray(W), 2))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(ct.without_node(jnp.asarray(W), 3), W)  # nobody removed


@pytest.fixture(scope="module")
def four():
    """4 nodes: every coalition's value by a separate simulate run."""
    n, T = 4, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh", seed=11)
    W = random_stochastic(n, np.random.default_rng(2))
    opt = optax.sgd(0.4)
    traj = dj.simulate(loss, params, batches, W, optimizer=opt, update_scale=np.ones((T, n)))
    q = np.full(n, 1.0 / n)
    coalitions = np.array(list(itertools.product([0, 1], repeat=n)), float)  # [16, n]
    v = {}
    for c in coalitions:
        tr = dj.simulate(loss, params, batches, W, optimizer=opt,
                         update_scale=np.broadcast_to(c, (T, n)))
        v[tuple(int(x) for x in c)] = objective(loss, tr.final_params, probe, q)[0]
    return dict(n=n, loss=loss, probe=probe, traj=traj, coalitions=coalitions, v=v)


def exact_values(v, n):
    """Shapley (over all n! orders) and Banzhaf (over all 2^(n−1) coalitions) by brute
    force."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        s = [0] * n
        for j in order:
            before = v[tuple(s)]
            s[j] = 1
            phi[j] += v[tuple(s)] - before
    phi /= math.factorial(n)
    beta = np.zeros(n)
    for key, value in v.items():
        for j in range(n):
            if key[j] == 0:
                with_j = list(key)
                with_j[j] = 1
                beta[j] += v[tuple(with_j)] - value
    return phi, beta / 2 ** (n - 1)


def test_coalition_values_shapley_and_banzhaf_against_enumeration(four):
    p = four
    n, loss, traj, probe, v = p["n"], p["loss"], p["traj"], p["probe"], p["v"]
    phi, beta = exact_values(v, n)
    full, none = v[(1,) * n], v[(0,) * n]
    got = ct.coalition_values(loss, traj, probe, p["coalitions"])
    np.testing.assert_allclose(got, [v[tuple(int(x) for x in c)] for c in p["coalitions"]],
                               rtol=0, atol=1e-10)
    # every permutation accounted for: exact
    ex = ct.shapley(loss, traj, probe, num_permutations=24)
    assert ex.exact and ex.num_samples == 24
    np.testing.assert_allclose(ex.values, phi, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ex.stderr, np.zeros(n))
    np.testing.assert_allclose([ex.grand, ex.empty], [full, none], rtol=0, atol=1e-10)
    # sampled (antithetic pairs): within its reported error, and efficient
    sm = ct.shapley(loss, traj, probe, num_permutations=16, round_size=8, seed=1)
    assert not sm.exact and sm.num_samples == 16
    err = np.asarray(sm.stderr)
    assert np.all(err > 0) and np.all(np.isfinite(err))
    assert np.all(np.abs(np.asarray(sm.values) - phi) <= 4 * err)
    assert np.isclose(np.sum(sm.values), full - none, rtol=0, atol=1e-12)
    assert np.isclose(np.sum(ex.values), full - none, rtol=0, atol=1e-12)
    # a loose target stops after the first round
    early = ct.shapley(loss, traj, probe, num_permutations=20, round_size=8, seed=1,
                       target_error=1.0)
    assert early.num_samples == 8
    bz = ct.banzhaf(loss, traj, probe, num_samples=16)
    assert bz.exact and bz.num_samples == 16
    np.testing.assert_allclose(bz.values, beta, rtol=0, atol=1e-10)


def test_sampled_banzhaf_and_plain_shapley_within_error(four):
    p = four
    n, loss, traj, probe = p["n"], p["loss"], p["traj"], p["probe"]
    phi, beta = exact_values(p["v"], n)
    bz = ct.banzhaf(loss, traj, probe, num_samples=14, seed=3)
    assert not bz.exact and bz.num_samples == 14
    assert np.all(np.abs(np.asarray(bz.values) - beta) <= 4 * np.asarray(bz.stderr))
    plain = ct.shapley(loss, traj, probe, num_permutations=8, antithetic=False,
                       round_size=8, seed=2)
    assert np.all(np.abs(np.asarray(plain.values) - phi) <= 4 * np.asarray(plain.stderr))


def test_bad_input(four):
    p = four
    loss, traj, probe = p["loss"], p["traj"], p["probe"]
    cases = [
        (ct.leave_one_out, {"mode": "nodes"}, "mode"),
        (ct.leave_one_out, {"batch_size": 0}, "batch_size"),
        (ct.leave_one_out, {"batch_size": 1.5}, "batch_size"),
        (ct.leave_one_out, {"memory_budget": -1}, "memory_budget"),
        (ct.leave_one_out, {"memory_budget": 1}, "memory_budget"),  # one run does not fit
        (ct.leave_one_out, {"node_weights": np.ones(3)}, "node_weights"),
        (ct.leave_one_out, {"observers": 1}, "observers"),
        (ct.shapley, {"target_error": 0.0}, "target_error"),
        (ct.shapley, {"target_error": float("nan")}, "target_error"),
        (ct.shapley, {"target_error": "small"}, "target_error"),
        (ct.shapley, {"num_permutations": 0}, "num_permutations"),
        (ct.shapley, {"num_permutations": True}, "num_permutations"),
        (ct.shapley, {"round_size": 3}, "round_size"),
        (ct.shapley, {"batch_size": -2}, "batch_size"),
        (ct.shapley, {"seed": 0.5}, "seed"),
        (ct.banzhaf, {"num_samples": 1}, "num_samples"),
    ]
    for fn, kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(loss, traj, probe, **kwargs)
    with pytest.raises(ValueError, match="traj"):
        ct.leave_one_out(loss, {"not": "a trajectory"}, probe)
    with pytest.raises(ValueError, match="coalitions"):
        ct.coalition_values(loss, traj, probe, np.ones((2, 3)))
    with pytest.raises(ValueError, match="record"):
        ct.leave_one_out(loss, traj.replace(states=None), probe)  # as if record=False


TINY_MODEL = """
import flax.linen as nn


class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def linear(num_classes):
    return Linear(num_classes)
"""


@pytest.mark.slow
def test_contribute_exact_command(tmp_path, capsys):
    (tmp_path / "tiny_models.py").write_text(TINY_MODEL)  # a linear model compiles fast
    out = tmp_path / "out"
    argv = ["contribute", "--nodes", "4", "--batch", "8", "--steps", "3", "--eval-every", "0",
            "--probe-size", "16", "--test-size", "48", "--permuted", "1", "--free-riders", "2",
            "--no-proximal", "--exact", "--permutations", "4",
            "--model", f"{tmp_path / 'tiny_models.py'}:linear", "--out", str(out)]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "leave-one-out (nats)" in printed and "Shapley (nats)" in printed
    assert "estimate vs leave-one-out: Pearson" in printed
    r = json.loads((out / "contribute.json").read_text())
    assert (out / "contribute_exact.png").stat().st_size > 0
    loo, sv = np.asarray(r["leave_one_out"]), np.asarray(r["shapley"])
    assert loo.shape == sv.shape == (4,)
    assert np.asarray(r["leave_one_out_observers"]).shape == (4, 4)
    assert loo[2] == 0.0 and sv[2] == 0.0  # the free-rider
    np.testing.assert_allclose(r["influence"], -np.asarray(r["contribution"]))
    assert r["shapley_permutations"] == 4 and not r["shapley_exact"]
    assert set(r["agreement"]) == {"leave_one_out", "shapley"}
    assert {"pearson", "spearman"} <= set(r["agreement"]["shapley"])
