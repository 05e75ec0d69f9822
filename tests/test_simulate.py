"""simulate() against an explicit per-node Python loop, invariants, chunking, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem, random_stochastic
from dicejax.simulate import final_state


def brute_force_run(loss_fn, params, batches, matrices, optimizer):
    """Explicit loops over steps and nodes; gossip as a double loop over (k, j)."""
    n = jax.tree.leaves(params)[0].shape[0]
    steps = jax.tree.leaves(batches)[0].shape[0]
    node_params = [jax.tree.map(lambda x, k=k: x[k], params) for k in range(n)]
    node_opt = [optimizer.init(p) for p in node_params]
    history, halves, losses = [node_params], [], []
    for t in range(steps):
        half, loss_t = [], []
        for k in range(n):
            batch = jax.tree.map(lambda x, t=t, k=k: x[t, k], batches)
            loss, g = jax.value_and_grad(loss_fn)(node_params[k], batch)
            upd, node_opt[k] = optimizer.update(g, node_opt[k], node_params[k])
            half.append(optax.apply_updates(node_params[k], upd))
            loss_t.append(float(loss))
        W = np.asarray(matrices[t])
        new = []
        for k in range(n):
            acc = jax.tree.map(jnp.zeros_like, half[k])
            for j in range(n):
                acc = jax.tree.map(lambda a, h, w=W[k, j]: a + w * h, acc, half[j])
            new.append(acc)
        node_params = new
        history.append(node_params)
        halves.append(half)
        losses.append(loss_t)

    def stack(seq):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *seq)

    return stack([stack(h) for h in history]), stack([stack(h) for h in halves]), np.array(losses)


def _topologies(n, steps, rng):
    return {
        "ring": (dj.topology.ring(n), np.stack([dj.topology.ring(n).matrix] * steps)),
        "directed_array": (W := random_stochastic(n, rng), np.stack([W] * steps)),
        "time_varying_array": (Ws := random_stochastic(n, rng, steps=steps), Ws),
        "one_peer_periodic": (op := dj.topology.one_peer_exponential(n), op.schedule(steps)),
    }


@pytest.mark.parametrize(
    "topo_name", ["ring", "directed_array", "time_varying_array", "one_peer_periodic"]
)
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "momentum"])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_simulate_equals_explicit_loop(topo_name, opt_name, method, rng):
    loss, params, batches, _ = make_problem(n=5, steps=5, model="tanh")
    topo, per_step = _topologies(5, 5, rng)[topo_name]
    opt = {
        "sgd": optax.sgd(0.3),
        "adam": optax.adam(0.05),
        "momentum": optax.sgd(0.1, momentum=0.9),
    }[opt_name]
    traj = dj.simulate(loss, params, batches, topo, optimizer=opt, mixing=method)
    assert traj.mixer.method == method
    ref_params, ref_half, ref_loss = brute_force_run(loss, params, batches, per_step, opt)
    for a, b in zip(jax.tree.leaves(traj.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(traj.half_params), jax.tree.leaves(ref_half)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(traj.final_params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b[-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(traj.metrics["loss"], ref_loss, rtol=1e-10)
    assert traj.metrics["loss"].shape == (5, 5)
    for a, b in zip(jax.tree.leaves(traj.matrices()), [per_step]):
        np.testing.assert_allclose(a, b, atol=1e-15)


def test_record_false_keeps_final_params_and_metrics():
    loss, params, batches, _ = make_problem()
    full = dj.simulate(loss, params, batches, dj.topology.ring(5))
    lean = dj.simulate(loss, params, batches, dj.topology.ring(5), record=False)
    assert lean.params is None and lean.half_params is None and lean.batches is None
    for a, b in zip(jax.tree.leaves(full.final_params), jax.tree.leaves(lean.final_params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.metrics["loss"], lean.metrics["loss"])


def test_second_call_with_equal_shapes_does_not_recompile():
    traces = []

    def loss(params, batch):
        traces.append(1)
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)))}
    b1 = {
        "x": jnp.asarray(rng.normal(size=(6, 4, 2, 3))),
        "y": jnp.asarray(rng.normal(size=(6, 4, 2))),
    }
    b2 = jax.tree.map(lambda x: x + 1.0, b1)
    topo = dj.topology.ring(4)
    dj.simulate(loss, params, b1, topo)
    first = len(traces)
    assert first > 0
    dj.simulate(loss, jax.tree.map(lambda x: x * 2, params), b2, topo)
    assert len(traces) == first, "second call with equal shapes re-traced the step"


@pytest.mark.parametrize("record", [pytest.param(True, marks=pytest.mark.slow), False])
def test_chunked_runs_equal_one_scan_bitwise(record):
    loss, params, batches, _ = make_problem(n=4, steps=10, model="tanh")
    topo = dj.topology.one_peer_exponential(4)
    opt = optax.adam(0.01)
    one = dj.simulate(loss, params, batches, topo, opt, record=record)
    chunked = dj.simulate(loss, params, batches, topo, opt, record=record, chunk_steps=3)

    def gen():
        for s in (0, 4, 7):
            e = {0: 4, 4: 7, 7: 10}[s]
            yield jax.tree.map(lambda x, s=s, e=e: x[s:e], batches)

    it = dj.simulate(loss, params, gen(), topo, opt, record=record)
    for other in (chunked, it):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)


def test_resume_from_final_state_equals_uninterrupted_run():
    loss, params, batches, _ = make_problem(n=4, steps=8, model="tanh")
    topo = dj.topology.one_peer_exponential(4)
    opt = optax.adam(0.02)
    whole = dj.simulate(loss, params, batches, topo, opt)
    first = dj.simulate(loss, params, jax.tree.map(lambda x: x[:5], batches), topo, opt)
    second = dj.simulate(
        loss,
        None,
        jax.tree.map(lambda x: x[5:], batches),
        topo,
        opt,
        initial_state=final_state(first),
    )
    assert second.start_step == 5
    for a, b in zip(jax.tree.leaves(whole.final_params), jax.tree.leaves(second.final_params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.metrics["loss"][5:], second.metrics["loss"])


def test_consensus_preserved_by_row_stochastic_mixing(rng):
    loss, params, batches, _ = make_problem(n=6, steps=4, same_init=True)
    W = random_stochastic(6, rng, steps=4)
    traj = dj.simulate(loss, params, batches, W, optimizer=optax.sgd(0.0))
    for leaf in jax.tree.leaves(traj.params):
        np.testing.assert_allclose(leaf, jnp.broadcast_to(leaf[:1, :1], leaf.shape), atol=1e-14)


def test_average_preserved_by_doubly_stochastic_mixing():
    loss, params, batches, _ = make_problem(n=8, steps=3)
    traj = dj.simulate(loss, params, batches, dj.topology.exponential(8), optimizer=optax.sgd(0),
                       consensus=True)
    assert dj.topology.exponential(8).is_doubly_stochastic
    for leaf in jax.tree.leaves(traj.params):
        np.testing.assert_allclose(
            leaf.mean(1), jnp.broadcast_to(leaf[0].mean(0), leaf.mean(1).shape), atol=1e-13
        )
    assert float(traj.metrics["consensus"][-1]) < float(traj.metrics["consensus"][0]) + 1e-12


def test_complete_graph_is_fedavg():
    loss, params, batches, _ = make_problem(n=4, steps=3, same_init=True)
    traj = dj.simulate(loss, params, batches, dj.topology.complete(4), optimizer=optax.sgd(0.5))
    for p, h in zip(jax.tree.leaves(traj.params), jax.tree.leaves(traj.half_params)):
        np.testing.assert_allclose(
            p[1:], jnp.broadcast_to(h.mean(1, keepdims=True), h.shape), atol=1e-14
        )


def test_gradient_wrt_mixing_matrix_matches_finite_differences(rng):
    """Gradients flow through simulate for [T, n, n] and [n, n] arrays (softmax rows)."""
    loss, params, batches, probe = make_problem(n=4, steps=4, model="tanh")

    def objective(logits):
        W = jax.nn.softmax(logits, axis=-1)  # row-stochastic for any logits
        traj = dj.simulate(loss, params, batches, W, record=False)
        return jnp.mean(jax.vmap(loss, in_axes=(0, None))(traj.final_params, probe))

    for shape in [(4, 4, 4), (4, 4)]:
        logits = jnp.asarray(rng.normal(size=shape))
        g = jax.grad(objective)(logits)
        direction = jnp.asarray(rng.normal(size=shape))
        eps = 1e-5
        fd = (objective(logits + eps * direction) - objective(logits - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-7)


def test_periodic_evaluation_matches_recorded_params():
    loss, params, batches, probe = make_problem(n=4, steps=7)
    traj = dj.simulate(loss, params, batches, dj.topology.ring(4), eval_batch=probe, eval_every=3)
    ev = traj.metrics["eval"]
    np.testing.assert_array_equal(ev["step"], [3, 6])
    for i, t in enumerate([3, 6]):
        p_t = jax.tree.map(lambda x, t=t: x[t], traj.params)
        expect = jax.vmap(loss, in_axes=(0, None))(p_t, probe)
        np.testing.assert_allclose(ev["loss"][i], expect, rtol=1e-12)


def test_replicate_stacks_copies():
    p = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    r = dj.replicate(p, 4)
    assert r["a"].shape == (4, 3) and r["b"].shape == (4, 2, 2)
    np.testing.assert_array_equal(r["a"][2], p["a"])
    with pytest.raises(ValueError, match="n"):
        dj.replicate(p, 0)


# ---- bad input -------------------------------------------------------------------------


def _bad(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_matrix_inputs():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    run = lambda W: dj.simulate(loss, params, batches, W)  # noqa: E731
    _bad(lambda: run(np.ones((4, 3)) / 3), "square")
    _bad(lambda: run(np.full((4, 4), 0.3)), "sum")
    neg = np.eye(4)
    neg[0] = [1.5, -0.5, 0.0, 0.0]
    _bad(lambda: run(neg), "negative")
    _bad(lambda: run(np.eye(5)), "5 nodes")
    _bad(lambda: run(np.stack([np.eye(4)] * 2)), "per-step matrices")
    nan = np.eye(4)
    nan[0, 0] = np.nan
    _bad(lambda: run(nan), "finite|NaN|nan")


def test_bad_leading_axes_and_values():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    topo = dj.topology.ring(4)
    wrong_n = jax.tree.map(lambda x: x[:, :3], batches)
    _bad(lambda: dj.simulate(loss, params, wrong_n, topo), "batches.*n=4")
    ragged = {"x": batches["x"], "y": batches["y"][:2]}
    _bad(lambda: dj.simulate(loss, params, ragged, topo), "batches.*disagree")
    empty = jax.tree.map(lambda x: x[:0], batches)
    _bad(lambda: dj.simulate(loss, params, empty, topo), "T = 0")
    bad_params = {"w": params["w"], "b": params["b"][:3]}
    _bad(lambda: dj.simulate(loss, bad_params, batches, topo), "params.*leading")
    nan_params = {"w": params["w"].at[0, 0, 0].set(jnp.nan), "b": params["b"]}
    _bad(lambda: dj.simulate(loss, nan_params, batches, topo), "params.*non-finite")
    _bad(lambda: dj.simulate(loss, params, batches, topo, eval_every=2), "eval_batch")
    _bad(lambda: dj.simulate(loss, params, batches, topo, chunk_steps=0), "chunk_steps")
    _bad(lambda: dj.simulate(loss, params, batches, topo, mixing="fast"), "mixing")


def test_update_scale_gates_local_updates():
    loss, params, batches, _ = make_problem(n=4, steps=3, model="tanh")
    topo = dj.topology.ring(4)
    opt = optax.adam(0.05)
    plain = dj.simulate(loss, params, batches, topo, opt)
    ones = dj.simulate(loss, params, batches, topo, opt, update_scale=np.ones(4))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(ones.params)):
        np.testing.assert_array_equal(a, b)  # a gate of 1 is exact
    scale = np.array([1.0, 0.0, -1.0, 3.0])
    traj = dj.simulate(loss, params, batches, topo, opt, update_scale=scale)
    np.testing.assert_array_equal(traj.update_scale, np.broadcast_to(scale, (3, 4)))
    # recompute step 1's local update by hand from the recorded state
    t = 1
    for k, s in enumerate(scale):
        theta = jax.tree.map(lambda x, k=k: x[t, k], traj.params)
        opt_k = jax.tree.map(lambda x, k=k: x[t, k], traj.opt_states)
        g = jax.grad(loss)(theta, jax.tree.map(lambda x, k=k: x[t, k], batches))
        upd, _ = opt.update(g, opt_k, theta)
        expect = jax.tree.map(lambda p, u, s=s: p + s * u, theta, upd)
        got = jax.tree.map(lambda x, k=k: x[t, k], traj.half_params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expect)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # the free-rider's optimizer state never moves (count included)
    for leaf in jax.tree.leaves(traj.opt_states):
        np.testing.assert_array_equal(leaf[:, 1], jnp.broadcast_to(leaf[0, 1], leaf[:, 1].shape))
    with pytest.raises(ValueError, match="update_scale"):
        dj.simulate(loss, params, batches, topo, opt, update_scale=np.ones(3))
    with pytest.raises(ValueError, match="update_scale"):
        dj.simulate(loss, params, batches, topo, opt, update_scale=np.ones((2, 4)))


def test_divergence_raises_floating_point_error_naming_step_and_node():
    loss, params, batches, _ = make_problem(n=4, steps=6)
    def exploding(p, b):  # finite until parameters grow past a threshold
        return loss(p, b) + jnp.where(jnp.abs(p["w"]).max() > 50, jnp.nan, 0.0)
    big = {"w": params["w"].at[2].multiply(40.0), "b": params["b"]}
    with pytest.raises(FloatingPointError, match=r"node \d+ .* at step \d+"):
        dj.simulate(exploding, big, batches, np.eye(4), optimizer=optax.sgd(1e4))
    # opting out returns the NaNs instead
    traj = dj.simulate(exploding, big, batches, np.eye(4), optimizer=optax.sgd(1e4),
                       check_finite=False)
    assert not np.all(np.isfinite(traj.metrics["loss"]))


def test_evaluation_in_bounded_node_groups_equals_vmap(monkeypatch):
    loss, params, batches, probe = make_problem(n=5, steps=4)
    topo = dj.topology.ring(5)
    full = dj.simulate(loss, params, batches, topo, eval_batch=probe, eval_every=2)
    import importlib

    sim_module = importlib.import_module("dicejax.simulator")
    monkeypatch.setattr(sim_module, "EVAL_EXAMPLES", 14)  # 7 probe examples: 2 nodes at a time
    jax.clear_caches()  # re-trace so the grouped path is the one compiled
    grouped = dj.simulate(loss, params, batches, topo, eval_batch=probe, eval_every=2)
    np.testing.assert_allclose(grouped.metrics["eval"]["loss"], full.metrics["eval"]["loss"],
                               rtol=1e-12)


def test_consensus_recorded_only_when_asked_and_equal_to_the_states():
    loss, params, batches, _ = make_problem(n=5, steps=3)
    topo = dj.topology.ring(5)
    plain = dj.simulate(loss, params, batches, topo)
    asked = dj.simulate(loss, params, batches, topo, consensus=True)
    assert "consensus" not in plain.metrics and asked.metrics["consensus"].shape == (3,)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(asked.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the metric does not change the run
    for t in range(3):  # (1/n) Σ_k ||θ_k^{t+1} − θ̄^{t+1}||², explicit loops over nodes
        flat = [np.concatenate([np.ravel(x[t + 1, k]) for x in jax.tree.leaves(plain.params)])
                for k in range(5)]
        mean = sum(flat) / 5
        expected = sum(float(np.sum((f - mean) ** 2)) for f in flat) / 5
        np.testing.assert_allclose(float(asked.metrics["consensus"][t]), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="consensus"):
        dj.simulate(loss, params, batches, topo, consensus="yes")
