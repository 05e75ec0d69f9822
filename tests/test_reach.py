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
from dicejax.influence import reach

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


@pytest.mark.slow  # the fast tier keeps test_reach_equals_explicit_reruns_and_walks
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


@pytest.mark.slow
def test_reach_with_model_state_and_keys_equals_dense(rng):
    from test_simulator import _dropout_loss, _stateful_loss

    n, T = 8, 5
    _, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    W = _sparse_directed(n, rng)
    traj = dj.simulate(_dropout_loss, params, batches, W, optax.adam(0.05),
                       key=jax.random.PRNGKey(2))
    for fn in (di.gt_cascade, di.e_cascade):
        _assert_same_cascade(fn(_dropout_loss, traj, probe, 1, 2, mode="reach"),
                             fn(_dropout_loss, traj, probe, 1, 2, mode="dense"), n)
    _, params, batches, probe = make_problem(n=n, steps=T, model="softmax")
    ms = {"mean": jnp.asarray(rng.normal(size=(n, 4)) * 0.3), "count": jnp.zeros((n,))}
    for gossip in (False, True):
        traj = dj.simulate(_stateful_loss, params, batches, W, optax.adam(0.05),
                           model_state=ms, gossip_model_state=gossip)
        for fn in (di.gt_cascade, di.e_cascade):
            _assert_same_cascade(fn(_stateful_loss, traj, probe, 1, 2, mode="reach"),
                                 fn(_stateful_loss, traj, probe, 1, 2, mode="dense"), n)


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


FORMS = {"forward": dict(adjoint=False, flat=False), "adjoint": dict(adjoint=True, flat=False),
         "flat": dict(adjoint=False, flat=True)}


def _e_form(loss, traj, probe, t, hops, q, form):
    """e_cascade's reach form run as ``form``: each source's tangent through every hop
    ("forward"), the last hop from edge pull-backs ("adjoint"), or every source at once
    from shared products ("flat")."""
    plan = di.plan_cascade(loss, traj, probe, t, hops, kind="e", mode="reach")
    plan = plan._replace(**FORMS[form])
    fn, args, static = di.cascade.chunk_program(loss, traj, probe, t, hops, jnp.asarray(q),
                                                plan, kind="e")
    return fn(*args, batch_size=plan.batch_size, **static)


@pytest.mark.parametrize(("graph", "opt"), [("ring", "sgd"), ("directed", "adam"),
                                            ("time_varying", "momentum")])
def test_adjoint_and_flat_forms_equal_forward_and_dense(graph, opt, rng):
    """The last hop from the edges' vector-Jacobian products (shared by every source) and
    the flat form (every source from shared products, no per-source tangent) against each
    source's tangent through every hop and against the dense cascade: SGD, momentum and
    Adam (optimizer-state tangents), run gates 0 and -1 in the window, static, directed and
    time-varying graphs, r = 1, 2, 3."""
    n, T = 9, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    scale = np.ones((T, n))
    scale[2, 3] = 0.0
    scale[3, 5] = -1.0
    traj = dj.simulate(loss, params, batches, GRAPHS[graph](n, T, rng), OPTIMIZERS[opt],
                       update_scale=scale)
    q = np.random.default_rng(1).uniform(0.5, 1.5, n)
    q = q / q.sum()
    for hops in (1, 2, 3):
        dense = di.e_cascade(loss, traj, probe, 1, hops, q, mode="dense")
        slow = _e_form(loss, traj, probe, 1, hops, q, "forward")
        _assert_same_cascade(slow, dense, n)
        for form in ("adjoint", "flat") if hops >= 2 else ("flat",):
            fast = _e_form(loss, traj, probe, 1, hops, q, form)
            _assert_same_cascade(fast, dense, n)
            for a, b in zip(fast.values, slow.values, strict=True):  # padded positions are 0
                _close(a, b)


def test_adjoint_and_flat_forms_equal_explicit_walks(rng):
    """The adjoint last hop and the flat form at r = 3 against explicit Hessians along
    every walk."""
    n, T = 8, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    traj = dj.simulate(loss, params, batches, _sparse_directed(n, rng), optax.sgd(0.2))
    q = np.full(n, 1.0 / n)
    want = ref.e_brute_sgd_walks(loss, traj, probe, 1, 3, q, lr=0.2)
    for form in ("adjoint", "flat"):
        got = _e_form(loss, traj, probe, 1, 3, q, form)
        np.testing.assert_allclose(got.total, want, rtol=1e-9, atol=1e-14)


def test_flat_form_with_keys_and_sampled_sources_equals_dense(rng):
    """The flat form with per-node PRNG keys (dropout) and a sample of sources."""
    from test_simulator import _dropout_loss

    n, T = 8, 5
    _, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    traj = dj.simulate(_dropout_loss, params, batches, _sparse_directed(n, rng),
                       optax.adam(0.05), key=jax.random.PRNGKey(2))
    for hops, sources in ((2, None), (3, [6, 1, 4])):
        plan = di.plan_cascade(_dropout_loss, traj, probe, 1, hops, kind="e",
                               sources=sources)
        assert plan.mode == "reach" and plan.flat
        got = di.e_cascade(_dropout_loss, traj, probe, 1, hops, sources=sources)
        want = di.e_cascade(_dropout_loss, traj, probe, 1, hops, sources=sources,
                            mode="dense")
        _close(got.total, want.total)
        _close(got.per_hop, want.per_hop)
        _close(got.network(), want.network())


def test_default_plan_takes_the_flat_or_adjoint_form_only_where_it_is_cheaper():
    T = 5
    for n in (12, 64):
        loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
        traj = dj.simulate(loss, params, batches, dj.topology.ring(n), optax.sgd(0.2))
        plan = lambda loss=loss, traj=traj, probe=probe, **kw: di.plan_cascade(  # noqa: E731
            loss, traj, probe, 1, kw.pop("hops", 3), kind="e", **kw)
        if n == 12:  # reach (1, 3, 5, 7): 12 x 3 <= 4 x 7 x 5 inner products per source
            for hops in (1, 2, 3):
                got = plan(hops=hops)
                assert got.flat and not got.adjoint and got.batch_size == n
            assert not plan(hops=4).flat  # beyond the meeting point of the two sides
            assert not plan(order=2).flat  # the curvature term needs the tangents
            assert not plan(batch_size=4).flat  # chunks asked for
            assert not plan(mode="dense").flat
            assert not plan(memory_budget=1e3).flat
            continue
        # 64 x 3 > 4 x 7 x 5: inner products against every node would cost more
        assert not plan().flat
        assert plan().adjoint  # 64 sources x 5 nodes at hop 2 > 64 x 3 edges
        assert not plan(hops=1).adjoint  # no update before the last hop
        assert not plan(order=2).adjoint  # the curvature term needs the last tangent
        assert not plan(sources=[0, 1]).adjoint  # 2 x 5 < 192: the pull-backs cost more
        assert not plan(mode="dense").adjoint
        assert not plan(memory_budget=1e3).adjoint  # the cotangents would take the budget


def test_flat_form_falls_back_to_chunks_when_its_program_exceeds_the_budget(monkeypatch):
    """Where the estimate lets the flat form through but XLA's count of its program exceeds
    the budget, the default call runs chunks of sources instead of failing."""
    n, T = 12, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    traj = dj.simulate(loss, params, batches, dj.topology.ring(n), optax.sgd(0.2))
    q = jnp.full(n, 1.0 / n)

    def need(flat):
        plan = di.plan_cascade(loss, traj, probe, 1, 3, kind="e", allow_flat=flat)
        assert plan.flat == flat
        fn, args, static = di.cascade.chunk_program(loss, traj, probe, 1, 3, q, plan, kind="e")
        return di.budget.compiled_bytes(fn.lower(*args, batch_size=1 if not flat else n,
                                                 **static).compile())

    whole, one = need(True), need(False)
    assert one < whole
    monkeypatch.setattr(di.cascade, "flat_bytes", lambda *a: 0)
    budget = (whole + one) // 2
    assert di.plan_cascade(loss, traj, probe, 1, 3, kind="e", memory_budget=budget).flat
    plans = []
    planner = di.cascade.plan_cascade
    monkeypatch.setattr(di.cascade, "plan_cascade",
                        lambda *a, **kw: plans.append(planner(*a, **kw)) or plans[-1])
    got = di.e_cascade(loss, traj, probe, 1, 3, memory_budget=budget)
    assert [p.flat for p in plans] == [True, False]  # the flat program was refused
    _close(got.total, di.e_cascade(loss, traj, probe, 1, 3, mode="dense").total)
