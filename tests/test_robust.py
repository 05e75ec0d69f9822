"""Byzantine-robust gossip (dicejax.robust) against explicit per-coordinate loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import dicejax as dj
import reference as ref
from conftest import make_problem, random_stochastic
from dicejax import robust


def heard(W, k):
    """Node k's heard nodes: its non-zero weights and itself, in index order."""
    return [j for j in range(W.shape[0]) if W[k, j] != 0 or j == k]


def explicit_combine(agg, finite=None):
    """``combine(half, W)`` of :func:`reference.explicit_steps` for a rule, by loops over
    nodes, heard nodes and coordinates (``finite``: nodes not heard)."""

    def combine(half, W):
        n = len(half)
        flats = [ravel_pytree(h)[0] for h in half]
        unravel = ravel_pytree(half[0])[1]
        out = []
        for k in range(n):
            hs = [j for j in heard(W, k) if finite is None or finite[j]]
            x = np.asarray(flats[k])
            if agg.rule == "clipped_gossip":
                others = [j for j in hs if j != k]
                dist = [float(np.linalg.norm(np.asarray(flats[j]) - x)) for j in others]
                tau = agg.tau if agg.tau is not None else (
                    float(np.quantile(dist, agg.quantile)) if dist else np.inf)
                new = x.copy()
                for j, d in zip(others, dist, strict=True):
                    z = np.asarray(flats[j]) - x
                    new = new + W[k, j] * z * (min(1.0, tau / d) if d > 0 else 1.0)
            else:
                new = np.empty_like(x)
                for c in range(x.size):
                    vals = sorted(float(flats[j][c]) for j in hs)
                    if agg.rule == "median":
                        new[c] = np.median(vals)
                    else:
                        b = min(agg.trim, (len(vals) - 1) // 2)
                        new[c] = np.mean(vals[b:len(vals) - b])
            out.append(unravel(jnp.asarray(new)))
        return out

    return combine


def dense_graph(n, rng):
    """A directed graph whose nodes each hear at least three others (trim 1 works)."""
    W = random_stochastic(n, rng, density=0.7)
    for k in range(n):  # make sure of it
        for j in ((k + 1) % n, (k + 2) % n):
            if W[k, j] == 0:
                W[k, j] = 0.1
    return W / W.sum(1, keepdims=True)


RULES = [robust.trimmed_mean(1), robust.trimmed_mean(0), robust.median(),
         robust.clipped_gossip(tau=0.3), robust.clipped_gossip(quantile=0.5)]
IDS = ["trim1", "trim0", "median", "clip_tau", "clip_quantile"]


@pytest.mark.parametrize("agg", RULES, ids=IDS)
def test_simulate_with_rule_equals_explicit_loops(agg):
    n, steps = 5, 3
    rng = np.random.default_rng(3)
    loss, params, batches, _ = make_problem(n=n, steps=steps, model="tanh", seed=1)
    mats = np.stack([dense_graph(n, rng) for _ in range(steps)])  # time-varying support
    opt = optax.sgd(0.4)
    traj = dj.simulate(loss, params, batches, mats, opt, aggregator=agg)
    p0 = [ref.node(params, k) for k in range(n)]
    o0 = [opt.init(p) for p in p0]
    expect = ref.explicit_steps(loss, opt, p0, o0, batches, mats,
                                combine=explicit_combine(agg))
    for s in range(steps):
        for k in range(n):
            np.testing.assert_allclose(ravel_pytree(ref.node(traj.params, s + 1, k))[0],
                                       ravel_pytree(expect[s][k])[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_rule_does_not_depend_on_the_gossip_kernel(method):
    """The rule reads only the graph: the same run from a dense and a sparse mixer."""
    n, steps = 12, 3
    loss, params, batches, _ = make_problem(n=n, steps=steps, seed=2)
    topo = dj.topology.exponential(n)
    base = dj.simulate(loss, params, batches, topo, mixing="dense", aggregator="median")
    got = dj.simulate(loss, params, batches, topo, mixing=method, aggregator="median")
    assert isinstance(got.mixer, robust.RobustMixer)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_array_equal(a, b)
    p0 = [ref.node(params, k) for k in range(n)]
    opt = optax.sgd(0.1)
    expect = ref.explicit_steps(loss, opt, p0, [opt.init(p) for p in p0], batches,
                                np.repeat(topo.matrix[None], steps, 0),
                                combine=explicit_combine(robust.median()))
    np.testing.assert_allclose(ravel_pytree(ref.node(got.params, steps, 4))[0],
                               ravel_pytree(expect[-1][4])[0], rtol=1e-12, atol=1e-13)


def test_median_bounds_a_huge_attacker_where_the_mean_follows_it():
    n = 4
    W = np.full((n, n), 1 / n)
    x = {"w": jnp.asarray([[0.0], [1.0], [2.0], [1e6]])}
    mean = dj.mixing.from_topology(W).apply(0, x)["w"]
    med = robust.median().wrap(dj.mixing.from_topology(W)).apply(0, x)["w"]
    trim = robust.trimmed_mean(1).wrap(dj.mixing.from_topology(W)).apply(0, x)["w"]
    clip = robust.clipped_gossip(tau=1.0).wrap(dj.mixing.from_topology(W)).apply(0, x)["w"]
    assert float(mean[0, 0]) > 1e5
    np.testing.assert_allclose(med[:, 0], 1.5)  # median of {0, 1, 2, 1e6}
    np.testing.assert_allclose(trim[:, 0], 1.5)  # mean of {1, 2}
    assert float(jnp.max(jnp.abs(clip[:3, 0]))) <= 2.0  # each neighbour moves it ≤ τ / 4


@pytest.mark.parametrize("agg", [robust.trimmed_mean(1), robust.clipped_gossip()],
                         ids=["trim1", "clip"])
def test_isolating_rule_does_not_hear_a_diverged_node(agg):
    """A NaN node is not heard (as if its edges were absent): its listeners stay finite and
    equal the explicit rule without it; the node itself stays NaN."""
    n = 5
    rng = np.random.default_rng(5)
    W = dense_graph(n, rng)
    x = {"a": jnp.asarray(rng.normal(size=(n, 3))), "b": jnp.asarray(rng.normal(size=(n,)))}
    x_nan = jax.tree.map(lambda v: v.at[2].set(jnp.nan), x)
    finite = np.array([True, True, False, True, True])
    mixer = agg.wrap(dj.mixing.from_topology(W))
    got = mixer.apply(0, x_nan, jnp.asarray(finite))
    half = [ref.node(x, k) for k in range(n)]
    expect = explicit_combine(agg, finite=finite)(half, W)
    for k in range(n):
        flat = ravel_pytree(ref.node(got, k))[0]
        if k == 2:
            assert bool(jnp.all(jnp.isnan(flat)))
        else:
            np.testing.assert_allclose(flat, ravel_pytree(expect[k])[0], rtol=1e-12)


def test_isolating_run_with_a_rule_keeps_the_listeners_finite():
    """Node 3 hears only itself and diverges at step 2 (its clock parameter ``c`` reaches
    the threshold, where the gradient is NaN); nodes 2 and 4 listen to it. Plain isolating
    gossip takes them down with it; the median does not hear a non-finite node."""
    n, steps = 6, 5
    loss, params, batches, _ = make_problem(n=n, steps=steps, seed=4)

    def clock_loss(p, b):  # d/dc = -1 below the threshold 3, NaN from it on
        return loss(p, b) - p["c"] + 0.0 * jnp.sqrt(jnp.maximum(3.0 - p["c"], 0.0))

    params = {**params, "c": jnp.asarray([-10.0, -10.0, -10.0, 1.0, -10.0, -10.0])}
    W = np.zeros((n, n))
    for k in range(n):
        W[k, [(k - 1) % n, k, (k + 1) % n]] = 1 / 3
    W[3] = np.eye(n)[3]
    opt = optax.sgd(1.0)
    plain = dj.simulate(clock_loss, params, batches, W, opt, on_divergence="isolate")
    assert np.asarray(plain.diverged).tolist() == [-1, 4, 3, 2, 3, 4]  # one hop a step
    traj = dj.simulate(clock_loss, params, batches, W, opt, on_divergence="isolate",
                       aggregator="median")
    assert np.asarray(traj.diverged).tolist() == [-1, -1, -1, 2, -1, -1]
    for leaf in jax.tree.leaves(traj.final_params):
        assert np.all(np.isfinite(np.asarray(leaf)[[0, 1, 2, 4, 5]]))
        assert np.all(np.isnan(np.asarray(leaf)[3]))


def test_dice_gt_and_leave_one_out_rerun_the_rule():
    n, steps = 5, 4
    rng = np.random.default_rng(9)
    loss, params, batches, probe = make_problem(n=n, steps=steps, model="tanh", seed=3)
    W = dense_graph(n, rng)
    agg = robust.trimmed_mean(1)
    traj = dj.simulate(loss, params, batches, W, optax.sgd(0.3), aggregator=agg)
    q = np.full(n, 1 / n)
    expect, _ = ref.gt_brute(loss, traj, probe, 1, 2, q, combine=explicit_combine(agg))
    got = dj.influence.dice_gt(loss, traj, probe, step=1, hops=2)
    np.testing.assert_allclose(got, expect, rtol=1e-8, atol=1e-14)
    loo = dj.apps.contribution.leave_one_out(loss, traj, probe)
    final = lambda t: float(np.mean([loss(ref.node(t.final_params, k), probe)  # noqa: E731
                                     for k in range(n)]))
    for j in (0, 3):
        scale = np.ones((steps, n))
        scale[:, j] = 0
        without = dj.simulate(loss, params, batches, W, optax.sgd(0.3), update_scale=scale,
                              aggregator=agg)
        np.testing.assert_allclose(float(loo[j]), final(traj) - final(without), rtol=1e-10,
                                   atol=1e-13)


def test_linear_estimators_refuse_robust_runs():
    loss, params, batches, probe = make_problem(n=4, steps=3)
    traj = dj.simulate(loss, params, batches, np.full((4, 4), 0.25), aggregator="median")
    with pytest.raises(ValueError, match="traj: ran with robust gossip"):
        dj.influence.dice_e(loss, traj, probe, step=0, hops=2)
    with pytest.raises(ValueError, match="traj: ran with robust gossip"):
        dj.influence.proximal(loss, traj, probe, step=0)
    with pytest.raises(ValueError, match="mode: 'node'"):
        dj.apps.contribution.leave_one_out(loss, traj, probe, mode="node")


def test_bad_rules_and_arguments():
    with pytest.raises(ValueError, match="trim"):
        robust.trimmed_mean(-1)
    with pytest.raises(ValueError, match="tau"):
        robust.clipped_gossip(tau=0.0)
    with pytest.raises(ValueError, match="quantile"):
        robust.clipped_gossip(quantile=0)
    with pytest.raises(ValueError, match="aggregator: unknown rule"):
        robust.by_name("krum")
    loss, params, batches, _ = make_problem(n=4, steps=2)
    ring = dj.topology.ring(4)  # each node hears 3 values: trim 2 leaves none
    with pytest.raises(ValueError, match="trim: a node hears only 3"):
        dj.simulate(loss, params, batches, ring, aggregator=robust.trimmed_mean(2))
    with pytest.raises(ValueError, match="aggregator: must be"):
        dj.simulate(loss, params, batches, ring, aggregator=3)
    mesh = dj.parallel.node_mesh()
    with pytest.raises(ValueError, match="aggregator: robust gossip runs on one device"):
        dj.simulate(loss, params, batches, ring, aggregator="median", mesh=mesh)


@pytest.mark.parametrize("width", [1, 2, 5, 6, 9])
def test_sorting_network_sorts_every_binary_input(width):
    """The 0-1 principle: a comparator network that sorts every 0/1 input sorts all."""
    import itertools
    for bits in itertools.product([0, 1], repeat=width):
        v = list(bits)
        for i, j in robust.sorting_network(width):
            v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
        assert v == sorted(bits)
