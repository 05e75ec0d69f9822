"""The per-source options of the reach-restricted cascades: ``sources=``, chunks, memory
budgets, ``mode="auto"``, the support-only proximal path, the network readings' sources and
the alignment's sampled sources (split from ``test_reach.py`` so that the two files run on
different test workers)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem
from dicejax import influence as di
from dicejax.influence import budget, cascade, reach
from test_reach import _close, _sparse_directed


@pytest.mark.slow
def test_sources_subset_and_chunks_give_the_same_scores(rng):
    n, T = 12, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    traj = dj.simulate(loss, params, batches, dj.topology.ring(n), optax.sgd(0.2))
    full = {m: di.dice_gt(loss, traj, probe, 1, 2, mode=m) for m in ("reach", "dense")}
    full_e = di.dice_e(loss, traj, probe, 1, 2, mode="dense")
    idx = np.array([7, 2, 2, 11])
    # (the dense cascades' chunks against their unchunked form: tests/test_influence.py)
    for m, batch_size in (("reach", None), ("reach", 3), ("dense", None)):
        _close(di.dice_gt(loss, traj, probe, 1, 2, sources=idx, mode=m,
                          batch_size=batch_size), full[m][idx])
        _close(di.dice_e(loss, traj, probe, 1, 2, sources=idx, mode=m,
                         batch_size=batch_size), full_e[idx])
    _close(full["reach"], full["dense"])
    # a budget between XLA's bytes of one source per chunk and of all twelve: smaller
    # chunks, within the budget, the same numbers
    plan = di.plan_cascade(loss, traj, probe, 1, 2, kind="gt", batch_size=1)
    fn, args, static = cascade.chunk_program(loss, traj, probe, 1, 2, jnp.full((n,), 1.0 / n),
                                             plan, kind="gt")
    need = {k: budget.compiled_bytes(fn.lower(*args, batch_size=k, **static).compile())
            for k in (1, n)}
    assert need[1] < need[n]
    budget.FITTED.clear()
    _close(di.dice_gt(loss, traj, probe, 1, 2, memory_budget=(need[1] + need[n]) // 2),
           full["reach"])
    used = [k for (_, k) in budget.FITTED]
    assert used and min(used) < n
    assert budget.compiled_bytes(budget.FITTED[next(reversed(budget.FITTED))]) <= (
        need[1] + need[n]) // 2
    cas = di.gt_cascade(loss, traj, probe, 1, 2, sources=[4])
    assert isinstance(cas, di.SparseCascade) and cas.total.shape == (1,)
    assert cas.nodes[0].shape == (1, 3) and cas.nodes[0][0].tolist() == [3, 4, 5]


@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"memory_budget: a chunk of one source needs .* "
                       r"\(XLA's buffer assignment of the compiled DICE-GT program"):
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
    assert budget.available_memory() > 0 and budget.default_budget() > 0


class _Program:
    """A stand-in compiled program whose buffers take ``F + k S`` bytes."""

    def __init__(self, k, fixed, per):
        self.k, self.bytes = k, fixed + k * per

    def memory_analysis(self):
        return SimpleNamespace(temp_size_in_bytes=self.bytes - 8, output_size_in_bytes=8,
                               alias_size_in_bytes=0)


@pytest.mark.parametrize("num,first,fixed,per,limit", [
    (100, 10, 1000, 50, 10_000),   # the first guess fits: one compilation
    (100, 100, 1000, 50, 3_000),   # too big: shrinks to the largest equal chunk that fits
    (64, 64, 5000, 10, 5_400),
    (7, 7, 100, 1000, 3_500),
    (100, 1, 1000, 50, 5_000),     # a first guess of one source that fits
])
def test_fit_chunk_picks_the_largest_equal_chunk_within_the_budget(num, first, fixed, per,
                                                                   limit):
    calls = []

    def compile_at(k):
        calls.append(k)
        return _Program(k, fixed, per)

    balance = budget.balanced_chunk
    k, prog, need = budget.fit_chunk(compile_at, first, num, limit, what="x", balance=balance)
    assert prog.k == k and need == fixed + k * per <= limit and len(calls) <= 3
    if fixed + first * per <= limit:
        assert k == first and calls == [first]
    else:  # brute force: the largest k <= first whose equal chunks fit
        best = max(c for c in range(1, first + 1) if fixed + balance(num, c) * per <= limit)
        assert k == balance(num, best)


def test_fit_chunk_refuses_when_one_source_does_not_fit():
    with pytest.raises(ValueError, match=r"memory_budget: a chunk of one source needs 1\.0 KiB "
                       r"\(XLA's buffer assignment of the compiled DICE-E program"):
        budget.fit_chunk(lambda k: _Program(k, 1000, 24), 8, 8, 900, what="DICE-E",
                         balance=budget.balanced_chunk)
    # a backend that does not report its buffers: the first guess runs
    k, _, need = budget.fit_chunk(lambda k: SimpleNamespace(memory_analysis=lambda: None), 4,
                                  8, 1, what="x", balance=budget.balanced_chunk)
    assert (k, need) == (4, None)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
