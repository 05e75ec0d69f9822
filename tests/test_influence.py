"""Influence engine against brute force: counterfactual loops, Hessians, walks, Jacobians."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
import reference as ref
from conftest import make_problem, random_stochastic
from dicejax import influence as di

RTOL = 1e-8


def _graph(kind, n, steps, rng):
    if kind == "directed":  # not symmetric, not doubly stochastic, static
        return random_stochastic(n, rng, density=0.4)
    if kind == "time_varying":
        return random_stochastic(n, rng, steps=steps, density=0.35)
    return dj.topology.ring(n)


def _run(kind="directed", opt=None, n=5, steps=6, seed=0, lr=0.3, update_scale=None):
    rng = np.random.default_rng(seed + 7)
    loss, params, batches, probe = make_problem(n=n, steps=steps, model="tanh", seed=seed)
    opt = optax.sgd(lr) if opt is None else opt
    traj = dj.simulate(loss, params, batches, _graph(kind, n, steps, rng), optimizer=opt,
                       update_scale=update_scale)
    q = rng.uniform(0.5, 1.5, size=n)
    return loss, traj, probe, q / q.sum()


def _fast_or_slow(cases, fast):
    """``pytest.param`` of each case, marked slow unless it is in ``fast`` (make test keeps a
    covering subset of a twin's cases; make test-slow runs them all)."""
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("kind,opt_name,hops", _fast_or_slow(
    [(k, o, h) for h in (1, 3) for o in ("sgd", "adam") for k in ("directed", "time_varying")],
    fast={("directed", "sgd", 1), ("time_varying", "adam", 1)}))
def test_dice_gt_equals_explicit_counterfactual_reruns(kind, opt_name, hops):
    opt = optax.sgd(0.3) if opt_name == "sgd" else optax.adam(0.05)
    loss, traj, probe, q = _run(kind, opt)
    t = 1
    expect, expect_net = ref.gt_brute(loss, traj, probe, t, hops, q)
    got = di.dice_gt(loss, traj, probe, step=t, hops=hops, node_weights=q)
    np.testing.assert_allclose(got, expect, rtol=RTOL, atol=1e-14)
    net = di.dice_gt_network(loss, traj, probe, step=t, hops=hops, node_weights=q)
    np.testing.assert_allclose(net, expect_net, rtol=RTOL, atol=1e-14)
    # bounded-memory path gives the same numbers
    batched = di.dice_gt(loss, traj, probe, step=t, hops=hops, node_weights=q, batch_size=2)
    np.testing.assert_allclose(batched, got, rtol=1e-12, atol=1e-15)


def test_dice_gt_with_attackers_equals_explicit_reruns():
    """Free-riders (0) and sign-flipping / scaling nodes (−1, 2) stay in the re-runs."""
    scale = np.array([1.0, 0.0, -1.0, 2.0, 1.0])
    loss, traj, probe, q = _run("time_varying", optax.adam(0.05), update_scale=scale)
    expect, expect_net = ref.gt_brute(loss, traj, probe, 1, 2, q)
    np.testing.assert_allclose(di.dice_gt(loss, traj, probe, step=1, hops=2, node_weights=q),
                               expect, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(
        di.dice_gt_network(loss, traj, probe, step=1, hops=2, node_weights=q), expect_net,
        rtol=RTOL, atol=1e-14)
    assert abs(float(di.dice_gt(loss, traj, probe, step=1, hops=2)[1])) < 1e-15  # free-rider


@pytest.mark.parametrize("kind,order,direct", _fast_or_slow(
    [(k, o, d) for o, d in ((1, "taylor"), (2, "taylor"), (1, "exact"), (2, "exact"))
     for k in ("directed", "time_varying", "ring")],
    fast={("directed", 1, "taylor"), ("ring", 2, "taylor"), ("time_varying", 1, "exact"),
          ("directed", 2, "exact")}))
def test_dice_e_sgd_equals_theorem1_walk_enumeration(kind, order, direct):
    loss, traj, probe, q = _run(kind, optax.sgd(0.3), n=4)
    t, hops = 1, 3
    expect = ref.e_brute_sgd_walks(
        loss, traj, probe, t, hops, q, lr=0.3, order=order, direct=direct
    )
    got = di.dice_e(
        loss, traj, probe, step=t, hops=hops, node_weights=q, order=order, direct=direct
    )
    np.testing.assert_allclose(got, expect, rtol=RTOL, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [True, False])
def test_source_chunks_give_the_same_cascades(unrolled, monkeypatch):
    """batch_size: chunks unrolled in one program, or (past the limit) a lax.map loop."""
    from dicejax.influence import cascade as cas_mod

    calls = []
    if not unrolled:
        monkeypatch.setattr(cas_mod, "MAX_UNROLLED_CHUNKS", 1)
        loop = jax.lax.map
        monkeypatch.setattr(jax.lax, "map", lambda *a, **k: calls.append(1) or loop(*a, **k))
    jax.clear_caches()  # the chunking is decided at trace time
    loss, traj, probe, q = _run("time_varying", optax.adam(0.05), n=5, steps=6)
    for order in (1, 2):
        full = di.e_cascade(loss, traj, probe, step=1, hops=3, node_weights=q, order=order,
                            mode="dense")
        part = di.e_cascade(loss, traj, probe, step=1, hops=3, node_weights=q, order=order,
                            batch_size=2, mode="dense")
        np.testing.assert_allclose(part.matrix, full.matrix, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(part.total, full.total, rtol=1e-12, atol=1e-16)
    gt = di.gt_cascade(loss, traj, probe, step=1, hops=3, node_weights=q, mode="dense")
    gt2 = di.gt_cascade(loss, traj, probe, step=1, hops=3, node_weights=q, batch_size=4,
                        mode="dense")
    np.testing.assert_allclose(gt2.matrix, gt.matrix, rtol=1e-12, atol=1e-16)
    assert bool(calls) == (not unrolled)


@pytest.mark.slow
@pytest.mark.parametrize("dense_rerun", [True, False])
def test_sparse_gossip_runs_give_the_same_influence(dense_rerun, monkeypatch):
    """A run gossiped through the neighbour list scores like the dense run of the same W."""
    from dicejax.influence import rerun as rerun_mod

    if not dense_rerun:  # re-runs keep the run's own sparse kernel
        monkeypatch.setattr(rerun_mod, "DENSE_RERUN_MAX_NODES", 0)
        jax.clear_caches()
    rng = np.random.default_rng(3)
    loss, params, batches, probe = make_problem(n=5, steps=5, model="tanh", seed=1)
    w = random_stochastic(5, rng, density=0.4)
    runs = {m: dj.simulate(loss, params, batches, w, optimizer=optax.adam(0.05), mixing=m)
            for m in ("dense", "sparse")}
    assert runs["sparse"].mixer.method == "sparse"
    assert (rerun_mod.rerun_simulator(loss, runs["sparse"]).mixer.method == "dense") == dense_rerun
    for fn in (di.dice_gt, di.dice_e):
        got, expect = (np.asarray(fn(loss, runs[m], probe, step=1, hops=3))
                       for m in ("sparse", "dense"))
        np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-15)


@pytest.mark.slow
def test_long_cascades_run_as_a_loop_with_the_same_values(monkeypatch):
    """Past MAX_UNROLLED_HOPS the re-run is a lax.scan loop; the numbers do not change."""
    from dicejax.influence import rerun as rerun_mod

    loss, traj, probe, q = _run("directed", optax.sgd(0.3), n=4, steps=6)
    unrolled = di.gt_cascade(loss, traj, probe, step=1, hops=4, node_weights=q)
    monkeypatch.setattr(rerun_mod, "MAX_UNROLLED_HOPS", 1)
    jax.clear_caches()
    looped = di.gt_cascade(loss, traj, probe, step=1, hops=4, node_weights=q)
    np.testing.assert_allclose(looped.matrix, unrolled.matrix, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(looped.direct, unrolled.direct, rtol=1e-12, atol=1e-16)


@pytest.mark.slow  # the cascade's Jacobian products are also checked against walks above
@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
def test_e_cascade_matrix_equals_dense_jacobian_products(opt_name):
    opt = optax.adam(0.05) if opt_name == "adam" else optax.sgd(0.1, momentum=0.9)
    loss, traj, probe, q = _run("time_varying", opt, n=4, steps=6)
    t, hops = 2, 3
    expect = ref.e_brute_jacobians(loss, traj, probe, t, hops, q)
    cas = di.e_cascade(loss, traj, probe, step=t, hops=hops, node_weights=q)
    np.testing.assert_allclose(cas.matrix, expect, rtol=RTOL, atol=1e-14)
    # the adjoint (one reverse sweep) equals the forward cascade's network reading
    for h in (1, 2, 3):
        adj = di.dice_e_network(loss, traj, probe, step=t, hops=h, node_weights=q)
        np.testing.assert_allclose(adj, expect[h - 1].sum(axis=0), rtol=RTOL, atol=1e-14)


def test_paper_proposition1_one_hop_sgd():
    """r = 1, SGD (Proposition 1).

    −η [q_j g_j^t·∇L(θ_j^t; z_j^t) + Σ_{k∈S1} q_k W[k,j] g_k^{t+1}·∇L(θ_j^t; z_j^t)].
    """
    lr = 0.3
    loss, traj, probe, q = _run("directed", optax.sgd(lr))
    t, n = 2, traj.num_nodes
    W = np.asarray(traj.matrix_at(t))
    expect = []
    for j in range(n):
        theta_j = ref.node(traj.params, t, j)
        gtrain = jax.grad(loss)(theta_j, ref.node(traj.batches, t, j))

        def dot(a, b):
            return float(
                sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
            )

        val = q[j] * dot(jax.grad(loss)(theta_j, probe), gtrain)
        for k in range(n):
            if k != j and W[k, j] > 0:
                gk = jax.grad(loss)(ref.node(traj.params, t + 1, k), probe)
                val += q[k] * W[k, j] * dot(gk, gtrain)
        expect.append(-lr * val)
    got = di.dice_e(loss, traj, probe, step=t, hops=1, node_weights=q)
    np.testing.assert_allclose(got, expect, rtol=RTOL)


def test_proximal_equals_explicit_formula_and_first_hop():
    loss, traj, probe, q = _run("time_varying", optax.adam(0.05))
    for t in (0, 3):
        expect = ref.proximal_brute(loss, traj, probe, t, q)
        got = di.proximal(loss, traj, probe, step=t, node_weights=q)
        np.testing.assert_allclose(got, expect, rtol=RTOL, atol=1e-15)
        first_hop = di.e_cascade(loss, traj, probe, step=t, hops=1, node_weights=q).matrix[0]
        np.testing.assert_allclose(got, first_hop, rtol=1e-9, atol=1e-15)


def test_shells_match_bfs(rng):
    mats = random_stochastic(7, rng, steps=4, density=0.25)
    got = np.asarray(di.shells(jnp.asarray(mats)))
    expect = ref.shells_bfs(mats)
    for s in range(4):
        for j in range(7):
            assert set(np.flatnonzero(got[s, :, j])) == expect[s][j]
            assert not got[s, j, j]


@pytest.mark.slow
def test_estimate_converges_to_ground_truth_for_small_steps():
    """DICE-E is the first-order expansion of DICE-GT: error shrinks faster than the score."""
    errors = []
    for lr in (0.1, 0.01):
        loss, traj, probe, _q = _run("directed", optax.sgd(lr), n=5, steps=5)
        gt = np.asarray(di.dice_gt(loss, traj, probe, step=1, hops=2))
        e1 = np.asarray(di.dice_e(loss, traj, probe, step=1, hops=2))
        e2 = np.asarray(di.dice_e(loss, traj, probe, step=1, hops=2, order=2))
        errors.append(
            (np.abs(e1 - gt).max() / np.abs(gt).max(), np.abs(e2 - gt).max() / np.abs(gt).max())
        )
    assert errors[1][0] < errors[0][0] / 5  # relative error of first order falls with lr
    assert errors[1][1] < errors[1][0]  # second order beats first order


def test_reciprocity_and_neighbourhood_factor():
    P = jnp.array([[0.0, -2.0, 0.0], [-1.0, 0.0, -3.0], [0.0, -1.5, 0.0]])
    R = di.reciprocity(P)
    assert float(R[0, 1]) == pytest.approx(2.0) and float(R[1, 0]) == pytest.approx(0.5)
    assert np.isnan(R[0, 2])
    F = di.neighbourhood_factor(P)
    # node 1 gives (-2) + (-1.5) = -3.5, receives (-1) + (-3) = -4
    assert float(F[1]) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="prox"):
        di.reciprocity(jnp.ones((2, 3)))


def test_influence_bad_inputs():
    loss, traj, probe, _q = _run("directed", n=4, steps=4)
    with pytest.raises(ValueError, match="step"):
        di.dice_gt(loss, traj, probe, step=4)
    with pytest.raises(ValueError, match="step"):
        di.dice_e(loss, traj, probe, step=-1)
    with pytest.raises(ValueError, match="hops"):
        di.dice_e(loss, traj, probe, step=2, hops=3)
    with pytest.raises(ValueError, match="hops"):
        di.dice_gt(loss, traj, probe, step=0, hops=0)
    with pytest.raises(ValueError, match="node_weights"):
        di.dice_e(loss, traj, probe, step=0, node_weights=np.ones(3) / 3)
    with pytest.raises(ValueError, match="node_weights"):
        di.proximal(loss, traj, probe, step=0, node_weights=-np.ones(4))
    with pytest.raises(ValueError, match="probe"):
        di.dice_e(loss, traj, {"x": probe["x"][:, :2], "y": probe["y"]}, step=0)
    with pytest.raises(ValueError, match="order"):
        di.dice_e(loss, traj, probe, step=0, order=3)
    lean = dj.simulate(
        loss, ref.node(traj.params, 0), traj.batches, traj.matrix_at(0), record=False
    )
    with pytest.raises(ValueError, match="record"):
        di.dice_gt(loss, lean, probe, step=0)
    bad = traj.replace(states=traj.states._replace(
        params=jax.tree.map(lambda x: x.at[2].set(jnp.nan), traj.params)))
    with pytest.raises(ValueError, match="non-finite"):
        di.dice_e(loss, bad, probe, step=1, hops=1)


@pytest.mark.slow
def test_influence_works_in_float32():
    with jax.enable_x64(False):
        loss, params, batches, probe = make_problem(n=4, steps=3, model="tanh")

        def cast(tree):
            return jax.tree.map(
                lambda x: x.astype(
                    jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
                ),
                tree,
            )

        traj = dj.simulate(loss, cast(params), cast(batches), dj.topology.ring(4))
        e = di.dice_e(loss, traj, cast(probe), step=0, hops=2)
        gt = di.dice_gt(loss, traj, cast(probe), step=0, hops=2)
        assert e.dtype == jnp.float32 and np.all(np.isfinite(e))
        assert np.corrcoef(e, gt)[0, 1] > 0.9
