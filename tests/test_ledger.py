"""Whole-run ledgers, full-trajectory attribution and per-sample scores vs brute force."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import dicejax as dj
import reference as ref
from conftest import make_problem, random_stochastic
from dicejax import influence as di


def _traj(opt, n=4, steps=5, seed=3):
    rng = np.random.default_rng(seed)
    loss, params, batches, probe = make_problem(n=n, steps=steps, model="tanh", seed=seed)
    W = random_stochastic(n, rng, steps=steps, density=0.4)
    return loss, dj.simulate(loss, params, batches, W, optimizer=opt), probe


@pytest.mark.parametrize("opt", [optax.sgd(0.3),
                                 pytest.param(optax.adam(0.05), marks=pytest.mark.slow)],
                         ids=["sgd", "adam"])
def test_trajectory_attribution_equals_adjoint_at_every_horizon(opt):
    loss, traj, probe = _traj(opt)
    q = np.array([0.1, 0.2, 0.3, 0.4])
    A = di.trajectory_attribution(loss, traj, probe, node_weights=q)
    assert A.shape == (5, 4)
    for t in (0, 3):  # each horizon compiles once: two suffice to pin the indexing
        expect = di.dice_e_network(loss, traj, probe, step=t, hops=5 - t, node_weights=q)
        np.testing.assert_allclose(A[t], expect, rtol=1e-9, atol=1e-15)


def test_trajectory_attribution_remat_changes_nothing():
    loss, traj, probe = _traj(optax.sgd(0.3))
    A = di.trajectory_attribution(loss, traj, probe)
    no_remat = di.trajectory_attribution(loss, traj, probe, remat=False)
    np.testing.assert_allclose(A, no_remat, rtol=1e-12, atol=1e-16)


def test_trajectory_attribution_last_step_matches_ground_truth_for_small_lr():
    loss, traj, probe = _traj(optax.sgd(0.01))
    A = di.trajectory_attribution(loss, traj, probe)
    gt = di.dice_gt_network(loss, traj, probe, step=4, hops=1)
    np.testing.assert_allclose(A[4], gt, rtol=2e-2)


@pytest.mark.slow
def test_ledger_equals_per_step_calls():
    loss, traj, probe = _traj(optax.adam(0.05), steps=6)
    led = di.ledger(loss, traj, probe, hops=2, stride=2)
    np.testing.assert_array_equal(led.steps, [0, 2, 4])
    prox = 0
    for i, t in enumerate([0, 2, 4]):
        np.testing.assert_allclose(led.scores[i], di.dice_e(loss, traj, probe, step=t, hops=2),
                                   rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(led.network[i],
                                   di.dice_e_network(loss, traj, probe, step=t, hops=2),
                                   rtol=1e-10, atol=1e-16)
        prox = prox + np.asarray(di.proximal(loss, traj, probe, step=t))
    np.testing.assert_allclose(led.proximal, prox, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(led.total, np.sum(led.scores, axis=0))
    with pytest.raises(ValueError, match="stride"):
        di.ledger(loss, traj, probe, stride=0)


@pytest.mark.parametrize("hops", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_per_sample_scores_sum_to_batch_score_and_match_walks(hops):
    lr = 0.3
    loss, traj, probe = _traj(optax.sgd(lr), steps=4)
    t = 1
    scores = di.dice_e_per_sample(loss, traj, probe, step=t, hops=hops)
    n, B = scores.shape
    assert B == 3
    np.testing.assert_allclose(scores.sum(axis=1), di.dice_e(loss, traj, probe, step=t,
                                                             hops=hops), rtol=1e-10)
    q = np.full(n, 1.0 / n)
    for i in range(B):
        updates = {}
        for j in range(n):
            theta = ref.node(traj.params, t, j)
            sample = jax.tree.map(lambda x, j=j, i=i: x[t, j, i:i + 1], traj.batches)
            g = jax.grad(loss)(theta, sample)
            updates[j] = jax.tree.map(lambda x: -lr * x / B, g)
        expect = ref.e_brute_sgd_walks(loss, traj, probe, t, hops, q, lr=lr, updates=updates)
        np.testing.assert_allclose(scores[:, i], expect, rtol=1e-8, atol=1e-15)


def test_per_sample_runs_for_adam():
    loss, traj, probe = _traj(optax.adam(0.05), steps=4)
    scores = di.dice_e_per_sample(loss, traj, probe, step=0, hops=2)
    assert scores.shape == (4, 3) and np.all(np.isfinite(scores))
