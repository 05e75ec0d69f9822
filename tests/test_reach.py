"""Reach-restricted cascades against the dense ones they replace (float64, 1e-12), the reach
tables against breadth-first search, the sources / budget options and their errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
import reference as ref
from conftest import make_problem
from dicejax import influence as di
from dicejax.influence import budget, reach

RTOL, ATOL = 1e-12, 1e-15


def _sparse_directed(n, rng, steps=None, degree=2):
    """Directed row-stochastic matrices with a few random in-neighbours per node (a reach
    well below n within 2 hops), self loops kept."""
    shape = (n, n) if steps is None else (steps, n, n)
    a = np.zeros(shape)
    for idx in np.ndindex(shape[:-1]):
        a[idx][rng.choice(n, size=degree, replace=False)] = rng.uniform(0.2, 1.0, size=degree)
    a = a + np.eye(n)
    return a / a.sum(-1, keepdims=True)


GRAPHS = {
    "ring": lambda n, T, rng: dj.topology.ring(n),
    "directed": lambda n, T, rng: _sparse_directed(n, rng),
    "time_varying": lambda n, T, rng: _sparse_directed(n, rng, steps=T),
    "one_peer": lambda n, T, rng: dj.topology.one_peer_exponential(n),
}
OPTIMIZERS = {"sgd": optax.sgd(0.3), "momentum": optax.sgd(0.1, momentum=0.9),
              "adam": optax.adam(0.05)}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


def _assert_same_cascade(sparse, dense, n):
    assert isinstance(sparse, di.SparseCascade) and isinstance(dense, di.Cascade)
    assert sparse.num_nodes == n
    got = sparse.dense()
    _close(got.matrix, dense.matrix)
    np.testing.assert_array_equal(got.shells, dense.shells)
    _close(sparse.matrix, dense.matrix)  # the dense readings on the sparse form
    np.testing.assert_array_equal(sparse.shells, dense.shells)
    _close(sparse.direct, dense.direct)
    _close(sparse.total, dense.total)
    _close(sparse.per_hop, dense.per_hop)
    for h in range(1, dense.hops + 1):
        _close(sparse.network(h), dense.network(h))


@pytest.mark.parametrize(("graph", "opt"), [("ring", "sgd"), ("directed", "adam"),
                                            ("time_varying", "momentum"), ("one_peer", "sgd")])
def test_reach_equals_dense_for_every_estimator(graph, opt, rng):
    n, T = 10, 6
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    topo = GRAPHS[graph](n, T, rng)
    scale = np.ones((T, n))
    scale[2, 3] = 0.0  # a run gate (free-rider step) inside the cascade window
    scale[1, 5] = -1.0
    traj = dj.simulate(loss, params, batches, topo, OPTIMIZERS[opt], update_scale=scale)
    t, hops = 1, 3
    q = np.random.default_rng(0).uniform(0.5, 1.5, n)
    q = q / q.sum()
    gt = [di.gt_cascade(loss, traj, probe, t, hops, q, mode=m) for m in ("reach", "dense")]
    _assert_same_cascade(*gt, n)
    for order, direct in ((1, "taylor"), (2, "exact")) if opt == "sgd" else ((1, "taylor"),):
        e = [di.e_cascade(loss, traj, probe, t, hops, q, order=order, direct=direct, mode=m)
             for m in ("reach", "dense")]
        _assert_same_cascade(*e, n)


def test_reach_equals_explicit_reruns_and_walks(rng):
    """The restricted cascade against the brute-force twins (explicit counterfactual re-runs,
    explicit Hessians along every walk), not only against the dense form."""
    n, T = 8, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    W = _sparse_directed(n, rng)
    traj = dj.simulate(loss, params, batches, W, optax.sgd(0.2))
    t, hops = 1, 2
    gt = di.gt_cascade(loss, traj, probe, t, hops, mode="reach")
    e = di.e_cascade(loss, traj, probe, t, hops, mode="reach")
    q = np.full(n, 1.0 / n)
    want_gt, want_net = ref.gt_brute(loss, traj, probe, t, hops, q)
    np.testing.assert_allclose(gt.total, want_gt, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(gt.network(), want_net, rtol=1e-9, atol=1e-14)
    want_e = ref.e_brute_sgd_walks(loss, traj, probe, t, hops, q, lr=0.2)
    np.testing.assert_allclose(e.total, want_e, rtol=1e-9, atol=1e-14)


def test_reach_with_model_state_and_keys_equals_dense(rng):
    from test_simulator import _dropout_loss, _stateful_loss

    n, T = 8, 5
    _, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    W = _sparse_directed(n, rng)
    traj = dj.simulate(_dropout_loss, params, batches, W, optax.adam(0.05),
                       key=jax.random.PRNGKey(2))
    for fn in (di.gt_cascade, di.e_cascade):
        _assert_same_cascade(fn(_dropout_loss, traj, probe, 1, 3, mode="reach"),
                             fn(_dropout_loss, traj, probe, 1, 3, mode="dense"), n)
    _, params, batches, probe = make_problem(n=n, steps=T, model="softmax")
    ms = {"mean": jnp.asarray(rng.normal(size=(n, 4)) * 0.3), "count": jnp.zeros((n,))}
    for gossip in (False, True):
        traj = dj.simulate(_stateful_loss, params, batches, W, optax.adam(0.05),
                           model_state=ms, gossip_model_state=gossip)
        for fn in (di.gt_cascade, di.e_cascade):
            _assert_same_cascade(fn(_stateful_loss, traj, probe, 1, 3, mode="reach"),
                                 fn(_stateful_loss, traj, probe, 1, 3, mode="dense"), n)


def test_reach_tables_equal_breadth_first_search(rng):
    n = 12
    mats = _sparse_directed(n, rng, steps=4)
    topo = dj.topology.from_matrix(mats)
    nbrs = reach.neighbour_list(dj.mixing.from_topology(topo, "dense"))
    sparse = reach.neighbour_list(dj.mixing.from_topology(topo, "sparse"))
    np.testing.assert_array_equal(nbrs.indices, sparse.indices)
    np.testing.assert_allclose(nbrs.weights, sparse.weights)
    sources = np.array([0, 5, 11, 5])
    tables = reach.reach_tables(nbrs, np.array([1, 2, 3]), sources)
    bfs = ref.shells_bfs(mats[1:4])
    for s in range(1, 4):
        for i, j in enumerate(sources):
            reached = {int(j)}.union(*[bfs[h][j] for h in range(s)])
            row = tables.nodes[s][i]
            assert set(row[row < n].tolist()) == reached
            assert list(row[row < n]) == sorted(reached)
            prev = tables.nodes[s - 1][i]
            for p, k in enumerate(row):
                if k == n:
                    continue
                where = np.flatnonzero(prev == k)
                want = where[0] if where.size else prev.size
                assert tables.prev_pos[s - 1][i, p] == want
                for d, nb in enumerate(nbrs.indices[k]):
                    where = np.flatnonzero(prev == nb) if nb < n else []
                    want = where[0] if len(where) else prev.size
                    assert tables.src_pos[s - 1][i, p, d] == want


def test_sources_subset_and_chunks_give_the_same_scores(rng):
    n, T = 12, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    traj = dj.simulate(loss, params, batches, dj.topology.ring(n), optax.sgd(0.2))
    full = {m: di.dice_gt(loss, traj, probe, 1, 2, mode=m) for m in ("reach", "dense")}
    full_e = di.dice_e(loss, traj, probe, 1, 2, mode="dense")
    idx = np.array([7, 2, 2, 11])
    for m in ("reach", "dense"):
        for batch_size in (None, 3):
            _close(di.dice_gt(loss, traj, probe, 1, 2, sources=idx, mode=m,
                              batch_size=batch_size), full[m][idx])
            _close(di.dice_e(loss, traj, probe, 1, 2, sources=idx, mode=m,
                             batch_size=batch_size), full_e[idx])
    _close(full["reach"], full["dense"])
    # a tiny budget forces one source per chunk: same numbers
    nb = budget.node_bytes(traj.simulator, traj.node_state(0, 0),
                           jax.tree.map(lambda x: x[0, 0], traj.batches), probe)
    one = budget.source_bytes(nb, (1, 3, 5), kind="gt", degree=3)
    _close(di.dice_gt(loss, traj, probe, 1, 2, memory_budget=one), full["reach"])
    cas = di.gt_cascade(loss, traj, probe, 1, 2, sources=[4])
    assert isinstance(cas, di.SparseCascade) and cas.total.shape == (1,)
    assert cas.nodes[0].shape == (1, 3) and cas.nodes[0][0].tolist() == [3, 4, 5]


def test_auto_mode_picks_reach_when_it_updates_fewer_nodes(rng):
    loss, params, batches, probe = make_problem(n=12, steps=4)
    ring = dj.simulate(loss, params, batches, dj.topology.ring(12))
    assert isinstance(di.e_cascade(loss, ring, probe, 0, 2), di.SparseCascade)
    assert isinstance(di.e_cascade(loss, ring, probe, 0, 3, mode="dense"), di.Cascade)
    full = dj.simulate(loss, params, batches, dj.topology.complete(12))
    assert isinstance(di.e_cascade(loss, full, probe, 0, 3), di.Cascade)
    assert isinstance(di.e_cascade(loss, full, probe, 0, 3, mode="reach"), di.SparseCascade)
    # one hop: only the source updates, whatever the graph
    assert isinstance(di.e_cascade(loss, full, probe, 0, 1), di.SparseCascade)
    assert reach.reach_is_cheaper((1, 5, 11, 16), 16, "e")
    assert not reach.reach_is_cheaper((1, 16, 16, 16), 16, "e")


def test_bad_sources_modes_and_budgets_raise_value_errors():
    loss, params, batches, probe = make_problem(n=6, steps=3)
    traj = dj.simulate(loss, params, batches, dj.topology.ring(6))
    for bad in ([], [6], [-1], [[0, 1]], [0.5], "a"):
        with pytest.raises(ValueError, match="sources"):
            di.dice_e(loss, traj, probe, 0, sources=bad)
    with pytest.raises(ValueError, match="mode"):
        di.dice_gt(loss, traj, probe, 0, mode="fast")
    for bad in (0, -5, float("nan"), "1GB", True):
        with pytest.raises(ValueError, match="memory_budget"):
            di.dice_gt(loss, traj, probe, 0, memory_budget=bad)
    with pytest.raises(ValueError, match=r"memory_budget: one source of DICE-GT needs about"):
        di.dice_gt(loss, traj, probe, 0, memory_budget=1000)
    with pytest.raises(ValueError, match="batch_size"):
        di.dice_e(loss, traj, probe, 0, batch_size=0)


def test_budget_estimate_grows_with_the_reach_and_the_order():
    nb = budget.NodeBytes(params=1000, opt_state=2000, model_state=0, activations=5000,
                          probe=3000)
    small = budget.source_bytes(nb, (1, 3, 5), kind="gt")
    assert small < budget.source_bytes(nb, (1, 3, 9), kind="gt")
    assert budget.source_bytes(nb, (1, 3, 5), kind="e") < budget.source_bytes(
        nb, (1, 3, 5), kind="e", order=2)
    assert budget.chunk_size(100, small, 10 * small, what="x") == 10
    assert budget.chunk_size(5, small, 10 * small, what="x") == 5
    assert budget.available_memory() > 0 and budget.default_budget() > 0


def test_support_only_proximal_equals_the_dense_product(monkeypatch, rng):
    import importlib

    from test_simulator import _stateful_loss

    prox_mod = importlib.import_module("dicejax.influence.proximal")  # the module, not the fn

    n = 12
    loss, params, batches, probe = make_problem(n=n, steps=4, model="tanh")
    topo = dj.topology.from_matrix(_sparse_directed(n, rng, steps=2))
    traj = dj.simulate(loss, params, batches, topo, optax.adam(0.05), mixing="sparse")
    _, sp, sb, sprobe = make_problem(n=n, steps=4, model="softmax")
    ms = {"mean": jnp.asarray(rng.normal(size=(n, 4)) * 0.3), "count": jnp.zeros((n,))}
    stateful = [dj.simulate(_stateful_loss, sp, sb, topo, mixing="sparse", model_state=ms,
                            gossip_model_state=g) for g in (False, True)]
    dense = [di.proximal(loss, traj, probe, t) for t in (1, 2)]
    dense += [di.proximal(_stateful_loss, tr, sprobe, 1) for tr in stateful]
    monkeypatch.setattr(prox_mod, "SUPPORT_MIN_NODES", 0)
    jax.clear_caches()
    got = [di.proximal(loss, traj, probe, t) for t in (1, 2)]
    got += [di.proximal(_stateful_loss, tr, sprobe, 1) for tr in stateful]
    for a, b in zip(got, dense, strict=True):
        _close(a, b)
    jax.clear_caches()


def test_network_readings_take_sources(rng):
    n = 10
    loss, params, batches, probe = make_problem(n=n, steps=4, model="tanh")
    traj = dj.simulate(loss, params, batches, dj.topology.ring(n))
    idx = np.array([9, 0, 4])
    _close(di.dice_e_network(loss, traj, probe, 1, 2, sources=idx),
           di.dice_e_network(loss, traj, probe, 1, 2)[idx])
    _close(di.dice_gt_network(loss, traj, probe, 1, 2, sources=idx, mode="reach"),
           di.dice_gt_network(loss, traj, probe, 1, 2, mode="dense")[idx])
    with pytest.raises(ValueError, match="sources"):
        di.dice_e_network(loss, traj, probe, 1, 2, sources=[n])


def test_alignment_samples_sources_when_asked():
    from dicejax.experiments.alignment import alignment, sample_sources
    from dicejax.experiments.common import RunConfig

    a = sample_sources(100, 7, 0, 3)
    assert len(set(a.tolist())) == 7 and a.max() < 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, sample_sources(100, 7, 0, 3))
    assert not np.array_equal(a, sample_sources(100, 7, 0, 4))
    assert sample_sources(8, 8, 0, 0) is None
    config = RunConfig(nodes=6, steps=4, eval_every=0, test_size=40, probe_size=16)
    r = alignment(config, hops=1, num_steps=2, dtype=jnp.float32, sources_per_step=3)
    assert r["pairs_per_hop"] == 2 * 3 and np.asarray(r["scores"]["gt"]).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="sources_per_step"):
        alignment(config, hops=1, num_steps=2, sources_per_step=7)
