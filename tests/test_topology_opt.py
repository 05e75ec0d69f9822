"""Topology optimisation: valid parameterisations, exact gradients, the optimiser and the CLI."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dicejax as dj
from conftest import make_problem
from dicejax import topology_opt as to

N, T = 4, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_problem(remat=True, model="softmax"):
    loss, params, batches, probe = make_problem(n=N, steps=T, batch=3, model=model)
    return to.Problem.create(loss, params, batches, probe, remat=remat)


def ring_support():
    return to.support_of(dj.topology.ring(N))


def directed_support():
    s = np.eye(N, dtype=bool)
    s[np.arange(N), (np.arange(N) + 1) % N] = True
    s[0, 2] = True
    return s


# ---- parameterisations ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [None, T])
def test_row_softmax_is_row_stochastic_on_support(rng, steps):
    support = directed_support()
    par = to.row_softmax(support)
    logits = par.init(steps) + jnp.asarray(rng.normal(size=par.init(steps).shape) * 3)
    w = np.asarray(par.weights(logits))
    assert w.shape == logits.shape
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-14)
    assert (w >= 0).all()
    assert (w[..., ~support] == 0).all()  # exactly zero off the support
    assert (w[..., support] > 0).all()
    dj.topology.validate_mixing(w)
    np.testing.assert_allclose(par.weights(par.init()), support / support.sum(1, keepdims=True))
    # Masked logits get exactly zero gradient.
    g = jax.grad(lambda x: jnp.sum(par.weights(x) * jnp.arange(N)))(logits)
    assert (np.asarray(g)[..., ~support] == 0).all()


def test_init_from_matrix_reproduces_it():
    mh = dj.topology.from_adjacency(dj.topology.ring(N).support).matrix
    for par in (to.row_softmax(ring_support()), to.sinkhorn(ring_support(), num_iters=5)):
        np.testing.assert_allclose(par.weights(par.init(matrix=mh)), mh, atol=1e-12)
        assert par.init(T, matrix=mh).shape == (T, N, N)
    with pytest.raises(ValueError, match="positive"):
        to.row_softmax(ring_support()).init(matrix=np.eye(N))


@pytest.mark.parametrize("steps", [None, T])
def test_sinkhorn_is_doubly_stochastic_and_symmetric(rng, steps):
    support = to.support_of(dj.topology.random_regular(8, 3, seed=1))
    par = to.sinkhorn(support, num_iters=200)
    logits = par.init(steps) + jnp.asarray(rng.normal(size=par.init(steps).shape))
    w = np.asarray(par.weights(logits))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-13)  # exact: last step is over rows
    np.testing.assert_allclose(w.sum(-2), 1.0, atol=1e-8)
    np.testing.assert_allclose(w, np.swapaxes(w, -1, -2), atol=1e-8)
    assert (w[..., ~support] == 0).all() and (w >= 0).all()
    with pytest.raises(ValueError, match="symmetric"):
        to.sinkhorn(directed_support())
    w_dir = np.asarray(to.sinkhorn(directed_support(), 300, symmetric=False).weights(
        jnp.asarray(rng.normal(size=(N, N)))))
    np.testing.assert_allclose(w_dir.sum(-2), 1.0, atol=1e-6)


def test_degree_budget_and_entropy(rng):
    support = np.ones((6, 6), dtype=bool)
    logits = jnp.asarray(rng.normal(size=(T, 6, 6)))
    for par in (to.row_softmax(support, max_degree=2), to.sinkhorn(support, 30, max_degree=2)):
        w = np.asarray(par.weights(logits))
        off = (w > 0) & ~np.eye(6, dtype=bool)
        assert off.sum(-1).max() <= 2 and (np.diagonal(w, axis1=-2, axis2=-1) > 0).all()
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    kept = np.asarray(to.top_k_support(logits, support, 2))
    off_logits = np.where(np.eye(6, dtype=bool), -np.inf, np.asarray(logits))
    np.testing.assert_array_equal(kept & ~np.eye(6, dtype=bool),
                                  off_logits >= np.sort(off_logits, -1)[..., -2:-1])
    # exp(entropy) - 1 counts the senders of a uniform row.
    np.testing.assert_allclose(to.effective_degree(jnp.asarray(
        dj.topology.ring(N).matrix)), 2.0, atol=1e-12)
    assert float(to.row_entropy(jnp.eye(N))) == 0.0


def test_spectral_gap_matches_eigenvalues(rng):
    gap = jax.jit(to.spectral_gap)
    for topo in (dj.topology.ring(8), dj.topology.exponential(8), dj.topology.hypercube(3)):
        np.testing.assert_allclose(gap(jnp.asarray(topo.matrix)), topo.spectral_gap, atol=1e-10)
    w = jnp.asarray(rng.uniform(size=(5, 5)) + np.eye(5))
    w = w / w.sum(1, keepdims=True)
    pi = to.stationary_distribution(w)
    np.testing.assert_allclose(pi @ w, pi, atol=1e-12)
    np.testing.assert_allclose(pi.sum(), 1.0)


# ---- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,steps", [("row_softmax", None), ("row_softmax", T),
                                        ("sinkhorn", None)])
def test_objective_gradients_match_finite_differences(rng, kind, steps):
    """Reverse-mode gradients of every objective w.r.t. the logits, [n, n] and [T, n, n]."""
    problem = tiny_problem(remat=False)  # remat is checked against this path below
    par = to.row_softmax(ring_support()) if kind == "row_softmax" else to.sinkhorn(
        ring_support(), num_iters=20)
    names = sorted(to.OBJECTIVES)

    def values(logits):
        w = par.weights(logits)
        return jnp.stack([to.OBJECTIVES[name](w, problem) for name in names])

    @jax.jit
    def values_and_jacobian(logits):  # one compilation serves the gradient and the FD values
        out, vjp = jax.vjp(values, logits)
        return out, jax.vmap(vjp)(jnp.eye(len(names)))[0]  # [objectives], [objectives, *shape]

    shape = par.init(steps).shape
    logits = jnp.asarray(rng.normal(size=shape))
    direction = jnp.asarray(rng.normal(size=shape))
    _, jac = values_and_jacobian(logits)
    eps = 1e-5
    fd = (values_and_jacobian(logits + eps * direction)[0]
          - values_and_jacobian(logits - eps * direction)[0]) / (2 * eps)
    np.testing.assert_allclose(jnp.tensordot(jac, direction, direction.ndim), fd, rtol=1e-6)


def test_contributions_equal_trajectory_attribution():
    problem = tiny_problem()
    w = jnp.asarray(dj.topology.exponential(N).matrix)
    traj = dj.simulate(problem.loss_fn, problem.params, problem.batches, w)
    a = dj.influence.trajectory_attribution(problem.loss_fn, traj, problem.probe)
    contrib, spread = jax.jit(lambda w: (to.whole_run_influence(w, problem),
                                         to.contribution_spread(w, problem)))(w)
    c = np.asarray(a.sum(0))
    np.testing.assert_allclose(contrib, c, rtol=1e-10)
    np.testing.assert_allclose(spread, c.var() / c.mean() ** 2, rtol=1e-10)


def test_remat_path_equals_plain_path_and_simulate(rng):
    par = to.row_softmax(ring_support())
    logits = jnp.asarray(rng.normal(size=(T, N, N)))
    out = []
    for remat in (True, False):
        problem = tiny_problem(remat=remat)

        def objective(x, p=problem):
            w = par.weights(x)
            return to.probe_loss(w, p), to.run_with(w, p)

        out.append(jax.jit(jax.value_and_grad(objective, has_aux=True))(logits))
    (value, roll), grad = out[0]
    (value_plain, roll_plain), grad_plain = out[1]
    np.testing.assert_allclose(value, value_plain, rtol=1e-13)
    np.testing.assert_allclose(grad, grad_plain, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(roll.loss, roll_plain.loss, rtol=1e-13)
    # The differentiable rollout is the simulator's run.
    problem = tiny_problem()
    traj = dj.simulate(problem.loss_fn, problem.params, problem.batches, par.weights(logits),
                       consensus=True)
    np.testing.assert_allclose(roll.loss, traj.metrics["loss"], rtol=1e-13)
    np.testing.assert_allclose(roll.consensus, traj.metrics["consensus"], rtol=1e-12)
    for leaf, ref in zip(jax.tree.leaves(roll.state.params), jax.tree.leaves(traj.final_params)):
        np.testing.assert_allclose(leaf, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        to.probe_loss(jnp.eye(N + 1), problem)


def test_optimizer_decreases_the_objective():
    par = to.row_softmax(to.support_of(dj.topology.random_regular(N + 2, 2, seed=0)))
    loss, params, batches, probe = make_problem(n=N + 2, steps=T, batch=3)
    problem = to.Problem.create(loss, params, batches, probe)
    opt = to.topology_optimizer("probe_loss", par, 0.2)
    result = to.optimize("probe_loss", problem, par, steps=12, optimizer=opt)
    start = result.history[0]  # the objective at the uniform weights
    assert np.all(np.diff(result.history[:4]) < 0)
    dj.topology.validate_mixing(result.weights)
    # The init/step pair continues from the returned state; its value is at the learned W.
    state, value = opt.step(result.state, problem)
    assert int(state.count) == 13 and float(value) < start - 1e-3
    with pytest.raises(ValueError, match="objective"):
        to.optimize("nope", problem, par, 1)


# ---- experiment and CLI --------------------------------------------------------------------


@pytest.mark.slow
def test_topo_opt_command_writes_json_and_figures(tmp_path, capsys):
    from dicejax.cli import _config, _run_args
    from dicejax.commands import topo_opt

    parser = argparse.ArgumentParser(prog="dicejax")
    sub = parser.add_subparsers(dest="command", required=True)
    topo_opt.register(sub, _run_args, _config)
    out = tmp_path / "results"
    args = parser.parse_args([
        "topo-opt", "--nodes", "6", "--steps", "4", "--batch", "8", "--test-size", "64",
        "--eval-every", "2", "--seeds", "2", "--opt-steps", "2", "--val-size", "32",
        "--baselines", "metropolis_hastings,ring,exponential", "--out", str(out)])
    assert args.topology == "random_regular"
    assert args.fn(args) == 0
    result = json.loads((out / "topo_opt.json").read_text())
    rows = result["topologies"]
    assert list(rows) == ["learned", "metropolis_hastings", "ring", "exponential"]
    for row in rows.values():
        assert len(row["test_accuracy"]["values"]) == 2
        assert 0 <= row["test_accuracy"]["mean"] <= 1
        assert len(row["curves"]["train_loss"]) == 4 and row["curves"]["eval_step"] == [2, 4]
    assert result["support"]["degree"] == 4 and rows["ring"]["degree"] == 2
    w = np.asarray(result["learned"]["weights"][0])
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-4)  # Sinkhorn: doubly stochastic
    assert len(result["learned"]["history"][1]) == 2
    for name in ("topo_opt_graph.png", "topo_opt_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    printed = " ".join(capsys.readouterr().out.split())
    assert "Learned vs standard graphs" in printed and "learned" in printed
