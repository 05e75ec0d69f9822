"""The fast paths of benchmarks/RESULTS.md §2 against slow, obviously correct twins.

* ``consensus_distance`` by a ``[1, n] × [n, P]`` product — against float64 numpy loops and
  the old ``jnp.mean(axis=0)`` formula, with and without padded nodes;
* ``_node_finite`` by a float row sum of ``x · 0`` — against ``np.isfinite`` per node, with
  NaN and ±inf planted in different nodes and leaves;
* ``gossip_sparse`` as per-leaf fused row gathers — against a double loop and the old
  concatenate + ``[n, D, P]`` gather + batched product, values and gradients;
* ``simulate(unroll=k)`` (fully unrolled scans of ``k`` steps) — against one scan to 1e-12 in
  float64, with every option that touches the chunk loop.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem, random_stochastic
from dicejax import mixing, parallel
from dicejax.simulate import consensus_distance, final_state

sim = importlib.import_module("dicejax.simulate")
TESTS = Path(__file__).resolve().parent


def _tree(n, rng, dtype=np.float64):
    return {"a": jnp.asarray(rng.normal(size=(n, 3, 2)).astype(dtype)),
            "b": jnp.asarray(rng.normal(size=(n,)).astype(dtype)),
            "c": jnp.asarray((rng.normal(size=(n, 4, 1, 2)) * 100).astype(dtype))}


# --------------------------------------------------------------------------------------------
# consensus distance
# --------------------------------------------------------------------------------------------


def _consensus_loop(tree, m):
    """float64 numpy, explicit loops over nodes and entries."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        x = np.asarray(x, np.float64).reshape(x.shape[0], -1)[:m]
        for p in range(x.shape[1]):
            mean = sum(x[k, p] for k in range(m)) / m
            total += sum((x[k, p] - mean) ** 2 for k in range(m))
    return total / m


def _consensus_old(tree):
    """The library's previous formula (a column reduction)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    sq = [jnp.sum((x - jnp.mean(x, axis=0, keepdims=True)) ** 2) for x in jax.tree.leaves(tree)]
    return sum(sq) / n


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_consensus_distance_equals_loop_and_old_formula(dtype, rng):
    tree = _tree(6, rng, dtype)
    want = _consensus_loop(tree, 6)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    got = jax.jit(consensus_distance)(tree)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol)
    np.testing.assert_allclose(consensus_distance(tree), _consensus_old(tree), rtol=tol)
    # a consensus has distance zero (up to the rounding of the average); one node alone too
    same = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), tree)
    assert float(consensus_distance(same)) <= 1e-24 if dtype == np.float64 else 1e-8
    assert float(consensus_distance(jax.tree.map(lambda x: x[:1], tree))) == 0.0


def test_consensus_distance_ignores_padded_nodes_whatever_they_hold(rng):
    tree = _tree(8, rng)
    want = _consensus_loop(tree, 5)
    padded = jax.tree.map(lambda x: x.at[5].set(jnp.nan).at[6].set(jnp.inf).at[7].set(1e300),
                          tree)
    got = jax.jit(consensus_distance, static_argnums=1)(padded, 5)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(consensus_distance(tree, 8), _consensus_loop(tree, 8), rtol=1e-12)


def test_consensus_distance_is_differentiable(rng):
    x = jnp.asarray(rng.normal(size=(5, 3)))
    g = jax.grad(consensus_distance)(x)
    # d/dx_k of (1/n) Σ_k ||x_k − x̄||² is (2/n)(x_k − x̄)
    np.testing.assert_allclose(g, 2 / 5 * (x - x.mean(axis=0)), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# finiteness flags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_node_finite_flags_nan_and_inf_in_any_leaf(dtype, rng):
    tree = _tree(6, rng, dtype)
    tree["count"] = jnp.zeros((6, 2), jnp.int32)  # integer leaves are not checked
    big = float(np.finfo(dtype).max)
    tree["a"] = tree["a"].at[1, 2, 0].set(np.inf).at[4].set(big)  # huge but finite
    tree["b"] = tree["b"].at[3].set(np.nan)
    tree["c"] = tree["c"].at[5, 3, 0, 1].set(-np.inf)
    want = np.array([all(bool(np.all(np.isfinite(np.asarray(x[k]))))
                         for x in jax.tree.leaves(tree) if x.dtype != jnp.int32)
                     for k in range(6)])
    np.testing.assert_array_equal(want, [True, False, True, False, True, False])
    np.testing.assert_array_equal(jax.jit(sim.node_finite)(tree), want)
    clean = _tree(6, rng, dtype)
    assert bool(jnp.all(sim.node_finite(clean)))


# --------------------------------------------------------------------------------------------
# sparse gossip
# --------------------------------------------------------------------------------------------


def _gossip_loop(W, tree):
    n = W.shape[0]
    return jax.tree.map(
        lambda x: np.stack([sum(np.float64(W[k, j]) * np.asarray(x[j], np.float64)
                                for j in range(n)) for k in range(n)]), tree)


def _gossip_sparse_old(indices, weights, tree):
    """The library's previous kernel: one [n, P] buffer, a [n, D, P] gather, a batched product."""

    def mix(buf):
        gathered = jnp.take(buf, indices, axis=0, mode="fill", fill_value=0)
        return jnp.einsum("kd,kdp->kp", weights.astype(buf.dtype), gathered,
                          precision=jax.lax.Precision.HIGHEST)

    return mixing.flat_apply(mix, tree)


def _lists(W):
    """Padded in-neighbour lists and their weights, as the simulator builds them."""
    m = mixing.make_mixer(jnp.asarray(W)[None], dj.topology.from_matrix(W).neighbors.indices)
    return m.indices, m.weights[0]


@pytest.mark.parametrize("density", [0.15, 0.5])
def test_gossip_sparse_equals_double_loop_and_old_kernel(density, rng):
    n = 11
    W = random_stochastic(n, rng, density=density)
    indices, weights = _lists(W)
    assert int(jnp.max(indices)) == n  # irregular degrees: some slots are padding
    tree = dict(_tree(n, rng), f32=jnp.asarray(rng.normal(size=(n, 5)).astype(np.float32)))
    got = jax.jit(mixing.gossip_sparse)(indices, weights, tree)
    old = _gossip_sparse_old(indices, weights, tree)
    want = _gossip_loop(W, tree)
    for name in tree:
        assert got[name].dtype == tree[name].dtype and got[name].shape == tree[name].shape
        tol = 1e-6 if tree[name].dtype == jnp.float32 else 1e-13
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)
        np.testing.assert_allclose(got[name], old[name], rtol=tol, atol=tol)


def test_gossip_sparse_spreads_a_nan_only_to_out_neighbours(rng):
    n = 9
    W = np.asarray(dj.topology.ring(n).matrix)
    indices, weights = _lists(W)
    x = jnp.asarray(rng.normal(size=(n, 4))).at[3, 1].set(jnp.nan)
    out = mixing.gossip_sparse(indices, weights, x)
    np.testing.assert_array_equal(np.isnan(out).any(axis=1), W[:, 3] > 0)


def test_gossip_sparse_gradients_equal_old_kernel_and_dense(rng):
    n = 7
    W = random_stochastic(n, rng, density=0.4)
    indices, weights = _lists(W)
    tree = _tree(n, rng)
    probe = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)

    def f(w, x, kernel):
        out = kernel(indices, w, x)
        return sum(jnp.sum(jnp.sin(o) * p) for o, p in
                   zip(jax.tree.leaves(out), jax.tree.leaves(probe)))

    gw, gx = jax.grad(f, argnums=(0, 1))(weights, tree, mixing.gossip_sparse)
    gw_old, gx_old = jax.grad(f, argnums=(0, 1))(weights, tree, _gossip_sparse_old)
    np.testing.assert_allclose(gw, gw_old, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gx_old)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    def g_dense(M):
        out = mixing.gossip_dense(M, tree)
        return sum(jnp.sum(jnp.sin(o) * p) for o, p in
                   zip(jax.tree.leaves(out), jax.tree.leaves(probe)))

    gd = np.asarray(jax.grad(g_dense)(jnp.asarray(W)))
    idx = np.asarray(indices)
    for k in range(n):
        for d in range(idx.shape[1]):
            if idx[k, d] < n:
                np.testing.assert_allclose(gw[k, d], gd[k, idx[k, d]], rtol=1e-12)
            else:
                assert float(gw[k, d]) == 0.0  # a padded slot gathers zeros


def test_auto_picks_the_gather_kernel_for_exponential_graphs():
    for n in (64, 256, 1024):
        topo = dj.topology.exponential(n)
        assert mixing.choose_method(n, topo.neighbors.indices.shape[1]) == "sparse"
    for n in (16, 32):  # D > n / 8: the per-leaf dense product is faster there
        topo = dj.topology.exponential(n)
        assert mixing.choose_method(n, topo.neighbors.indices.shape[1]) == "dense"
    assert mixing.choose_method(6, 1) == "dense"  # tiny graphs stay dense


# --------------------------------------------------------------------------------------------
# simulate(unroll=k)
# --------------------------------------------------------------------------------------------


def _assert_same(a, b):
    """Equal to 1e-12 (float64): XLA may fuse an unrolled step differently from the loop
    body (an occasional last-bit difference), the computation is the same."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def _case(steps=7):
    loss, params, batches, probe = make_problem(n=4, steps=steps, model="tanh")
    scale = np.random.default_rng(1).choice([1.0, 0.0, -1.0, 0.5], size=(steps, 4))
    return loss, params, batches, probe, scale


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["dense", "sparse"])
def test_unrolled_run_equals_one_scan(mix):
    loss, params, batches, probe, scale = _case()
    topo = dj.topology.one_peer_exponential(4)
    opt = optax.adam(0.05)
    kw = dict(eval_batch=probe, eval_every=2, update_scale=scale, mixing=mix)
    one = dj.simulate(loss, params, batches, topo, opt, unroll=0, **kw)
    assert one.metrics["eval"]["loss"].shape == (3, 4)
    for unroll in (3, 10):  # slices of 3, 3, 1 steps; one fully unrolled scan
        got = dj.simulate(loss, params, batches, topo, opt, unroll=unroll, **kw)
        _assert_same(one, got)  # params, half params, opt states, batches, metrics, eval
        np.testing.assert_array_equal(got.metrics["eval"]["step"], [2, 4, 6])
    lean = dj.simulate(loss, params, batches, topo, opt, record=False, unroll=3, **kw)
    _assert_same((one.final_params, one.metrics), (lean.final_params, lean.metrics))


@pytest.mark.slow
def test_unrolled_chunks_iterators_resume_and_callback_equal_one_scan():
    loss, params, batches, probe, scale = _case(steps=9)
    topo = dj.topology.ring(4)
    opt = optax.sgd(0.2, momentum=0.9)
    kw = dict(eval_batch=probe, eval_every=3, update_scale=scale)

    def run(unroll, **extra):
        calls = []
        traj = dj.simulate(loss, params, extra.pop("batches", batches), topo, opt,
                           unroll=unroll,
                           callback=lambda st, done: calls.append((done, st.params)),
                           **kw, **extra)
        return traj, calls

    one, calls_one = run(0, chunk_steps=4)
    assert [c[0] for c in calls_one] == [4, 8, 9]
    for extra in ({"chunk_steps": 4},
                  {"batches": (jax.tree.map(lambda x, s=s: x[s : s + 4], batches)
                               for s in (0, 4, 8))}):
        got, calls = run(3, **extra)
        _assert_same(one, got)
        assert [c[0] for c in calls] == [4, 8, 9]  # once per chunk, as without unrolling
        _assert_same([c[1] for c in calls_one], [c[1] for c in calls])
    # resuming from a state mid-run: global steps (evaluation, W^t) carry on
    first = dj.simulate(loss, params, jax.tree.map(lambda x: x[:5], batches), topo, opt,
                        eval_batch=probe, eval_every=3, update_scale=scale[:5], unroll=2)
    second = dj.simulate(loss, None, jax.tree.map(lambda x: x[5:], batches), topo, opt,
                         eval_batch=probe, eval_every=3, update_scale=scale[5:], unroll=3,
                         initial_state=final_state(first))
    _assert_same(one.final_params, second.final_params)
    _assert_same(one.metrics["loss"][5:], second.metrics["loss"])
    np.testing.assert_array_equal(second.metrics["eval"]["step"], [6, 9])
    _assert_same(one.metrics["eval"]["loss"][1:], second.metrics["eval"]["loss"])


@pytest.mark.slow
def test_unrolled_run_reports_divergence_at_the_same_global_step():
    loss, params, batches, _ = make_problem(n=4, steps=8)

    def exploding(p, b):  # finite until parameters grow past a threshold
        return loss(p, b) + jnp.where(jnp.abs(p["w"]).max() > 50, jnp.nan, 0.0)

    big = {"w": params["w"].at[2].multiply(40.0), "b": params["b"]}
    messages = []
    for unroll, chunk in ((0, None), (3, None), (2, 5), (0, 5)):
        with pytest.raises(FloatingPointError, match=r"node \d+ .* at step \d+") as err:
            dj.simulate(exploding, big, batches, np.eye(4), optimizer=optax.sgd(1e4),
                        unroll=unroll, chunk_steps=chunk)
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages
    # a run resumed at global step 3 names the step 3 later, unrolled or not
    t = int(re.search(r"at step (\d+)", messages[0]).group(1))
    state = sim.init(big, optax.sgd(1e4), step=3)
    for unroll in (0, 3):
        with pytest.raises(FloatingPointError, match=rf"at step {t + 3};") as err:
            dj.simulate(exploding, None, batches, np.eye(4), optimizer=optax.sgd(1e4),
                        unroll=unroll, initial_state=state)
        assert str(err.value) == messages[0].replace(f"at step {t};", f"at step {t + 3};")


def test_unrolled_run_differentiates_through_the_mixing_matrix(rng):
    loss, params, batches, _ = make_problem(n=4, steps=5)
    W = jnp.asarray(random_stochastic(4, rng))

    def f(W, unroll):
        traj = dj.simulate(loss, params, batches, W, record=False, unroll=unroll, consensus=True)
        return jnp.sum(traj.metrics["loss"]) + traj.metrics["consensus"][-1]

    np.testing.assert_allclose(jax.grad(f)(W, 2), jax.grad(f)(W, 0), rtol=1e-12, atol=1e-15)


def test_unroll_validation():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="unroll"):
            dj.simulate(loss, params, batches, dj.topology.ring(4), unroll=bad)


def _conv_loss(params, batch):
    """A one-filter-bank convolution + linear read-out, smooth (tanh)."""
    h = jax.lax.conv_general_dilated(batch["x"], params["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    logits = jnp.tanh(h).reshape(h.shape[0], -1) @ params["w"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))


def _conv_problem(n=3, steps=5, rng=None):
    rng = rng or np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(n, 3, 3, 1, 2)) * 0.5),
              "w": jnp.asarray(rng.normal(size=(n, 4 * 4 * 2, 3)) * 0.3)}
    batches = {"x": jnp.asarray(rng.normal(size=(steps, n, 2, 4, 4, 1))),
               "y": jnp.asarray(rng.integers(0, 3, size=(steps, n, 2)))}
    return params, batches


def _auto_unroll(loss_fn, params, batches, platform):
    simulator = dj.atc(loss_fn, optax.sgd(0.1), np.eye(jax.tree.leaves(params)[0].shape[0]))
    return sim.auto_unroll(simulator, simulator.init(params), batches, platform)


def test_auto_unroll_finds_convolutions_in_sub_jaxprs():
    params, batches = _conv_problem()
    loss, mlp_params, mlp_batches, _ = make_problem(n=3, steps=2, model="tanh")
    assert _auto_unroll(_conv_loss, params, batches, "cpu") == sim.CONV_UNROLL
    assert _auto_unroll(_conv_loss, params, batches, "gpu") == 0
    assert _auto_unroll(loss, mlp_params, mlp_batches, "cpu") == 0

    def nested(p, b):  # the convolution inside a checkpoint, a cond and a scan
        def body(c, _):
            return c + jax.lax.cond(True, jax.checkpoint(_conv_loss), lambda p, b: 0.0, p, b), None
        return jax.lax.scan(body, 0.0, None, length=2)[0]

    assert _auto_unroll(nested, params, batches, "cpu") == sim.CONV_UNROLL
    m = dj.models.get_model("cnn", 10, conv="xla")
    cnn = dj.models.init_params(m, jax.random.PRNGKey(0), (28, 28, 1), num_nodes=2)
    z = {"x": jnp.zeros((1, 2, 2, 28, 28, 1), jnp.float32), "y": jnp.zeros((1, 2, 2), jnp.int32)}
    assert _auto_unroll(dj.models.make_loss_fn(m), cnn, z, "cpu") == sim.CONV_UNROLL
    # The CPU default runs its convolutions as patch products (no convolution primitive):
    # one scan, which is the faster schedule for it (benchmarks/RESULTS.md §2).
    patches = dj.models.get_model("cnn", 10)
    assert _auto_unroll(dj.models.make_loss_fn(patches), cnn, z, "cpu") == 0


def test_conv_model_default_unroll_equals_one_scan():
    params, batches = _conv_problem(steps=6)
    topo = dj.topology.ring(3)
    auto = dj.simulate(_conv_loss, params, batches, topo, optax.adam(0.05))
    one = dj.simulate(_conv_loss, params, batches, topo, optax.adam(0.05), unroll=0)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_one_device_mesh_unrolled_equals_no_mesh():
    loss, params, batches, probe, scale = _case()
    topo = dj.topology.ring(4)
    mesh = parallel.node_mesh(jax.devices()[:1])
    kw = dict(eval_batch=probe, eval_every=2, update_scale=scale)
    ref = dj.simulate(loss, params, batches, topo, mixing="sparse", unroll=0, **kw)
    got = dj.simulate(loss, params, batches, topo, mixing="ppermute", mesh=mesh, unroll=3, **kw)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-13)


MESH_WORKER = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, optax
    import dicejax as dj
    from dicejax import parallel
    from conftest import make_problem

    assert len(jax.devices()) == 4, jax.devices()
    mesh = parallel.node_mesh()
    loss, params, batches, probe = make_problem(n=7, steps=7, model="tanh", seed=7)
    scale = np.random.default_rng(1).choice([1.0, 0.0, -1.0, 0.5], size=(7, 7))
    kw = dict(eval_batch=probe, eval_every=2, update_scale=scale, optimizer=optax.adam(0.05))
    worst = 0.0
    for topo, mix in ((dj.topology.ring(7), "dense"), (dj.topology.exponential(7), "ppermute")):
        ref = dj.simulate(loss, params, batches, topo, mixing="dense" if mix == "dense"
                          else "sparse", unroll=0, **kw)
        got = dj.simulate(loss, params, batches, topo, mixing=mix, mesh=mesh, unroll=3,
                          chunk_steps=5, **kw)
        la, lb = jax.tree.leaves(ref), jax.tree.leaves(got)
        assert len(la) == len(lb)
        worst = max([worst] + [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                               for a, b in zip(la, lb)])
    print("WORST", worst)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_unrolled_run_equals_single_device_scan():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", MESH_WORKER], env=env, capture_output=True,
                          text=True, timeout=240, cwd=TESTS)
    lines = [x for x in done.stdout.splitlines() if x.startswith("WORST ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    assert float(lines[-1].split()[1]) < 1e-9
