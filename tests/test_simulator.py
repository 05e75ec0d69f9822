"""The init/step/run simulator: a user's own loop, bit-identity with simulate, and what a user
bringing their own model needs (aux outputs, per-step PRNG keys, non-trainable model state),
each through simulate, run and the influence functions, against explicit loops in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem, random_stochastic
from dicejax import influence as di


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(a, b, rtol=1e-12, atol=1e-14):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# init / step / run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # make test keeps simulate against run in the gradient test below
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_simulate_equals_run_bit_for_bit(method, rng):
    loss, params, batches, probe = make_problem(n=9, steps=6, model="tanh")
    topo = dj.topology.ring(9)
    opt = optax.adam(0.05)
    scale = rng.choice([1.0, 0.0, -1.0, 0.5], size=(6, 9))
    traj = dj.simulate(loss, params, batches, topo, opt, mixing=method, update_scale=scale)
    sim = dj.atc(loss, opt, dj.mixing.from_topology(topo, method), consensus=False)
    assert sim.mixer.method == method
    state0 = sim.init(params)
    final, outs = dj.run(sim, state0, batches, jnp.asarray(scale), record=True)
    mine = dj.Trajectory.from_run(sim, state0, outs, batches, jnp.asarray(scale))
    _assert_trees_equal(traj.states, mine.states)
    _assert_trees_equal(traj.half_params, mine.half_params)
    _assert_trees_equal(traj.final_state, final)
    _assert_trees_equal(traj.metrics, mine.metrics)
    _assert_trees_equal(traj.gates, mine.gates)
    for fn in (di.dice_gt, di.dice_e):
        np.testing.assert_array_equal(fn(loss, traj, probe, 1, 3), fn(loss, mine, probe, 1, 3))


def test_own_loop_with_custom_actions_gives_simulates_influence(rng):
    """A user's loop over sim.step: a node drops out at step 2 (a gate the loop decides), a
    log of the loss in between; the trajectory it records scores like simulate's."""
    loss, params, batches, probe = make_problem(n=5, steps=6, model="tanh")
    W = random_stochastic(5, rng)
    opt = optax.sgd(0.3, momentum=0.9)
    sim = dj.atc(loss, opt, W)
    state0 = state = sim.init(params)
    outs, gates, log = [], [], []
    step = jax.jit(sim.step, static_argnames="record")
    for t in range(6):
        batch = jax.tree.map(lambda x, t=t: x[t], batches)
        gate = jnp.ones(5).at[1].set(0.0 if t == 2 else 1.0)  # the loop's own decision
        state, out = step(state, batch, gate, record=True)
        log.append(float(out.loss.mean()))  # host work between steps
        outs.append(out)
        gates.append(gate)
    mine = dj.Trajectory.from_run(sim, state0, outs, [jax.tree.map(lambda x, t=t: x[t], batches)
                                                      for t in range(6)], gates)
    scale = np.ones((6, 5))
    scale[2, 1] = 0.0
    traj = dj.simulate(loss, params, batches, W, opt, update_scale=scale)
    assert mine.num_steps == 6 and mine.start_step == 0 and len(log) == 6
    _assert_trees_close(mine.states.params, traj.params)
    for t in (0, 2):  # scored from before and at the drop-out step
        for fn in (di.dice_gt, di.dice_e):
            np.testing.assert_allclose(fn(loss, mine, probe, t, 3), fn(loss, traj, probe, t, 3),
                                       rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(di.dice_e(loss, mine, probe, 1, 3, order=2, direct="exact"),
                               di.dice_e(loss, traj, probe, 1, 3, order=2, direct="exact"),
                               rtol=1e-12, atol=1e-15)


def test_run_is_jittable_and_differentiable_in_the_mixing_matrix(rng):
    loss, params, batches, _ = make_problem(n=4, steps=4)
    W = jnp.asarray(random_stochastic(4, rng))

    def final_loss(W):
        sim = dj.atc(loss, optax.sgd(0.2), dj.mixing.make_mixer(W[None]))
        _, outs = dj.run(sim, sim.init(params), batches, remat=True)
        return jnp.sum(outs.loss) + outs.consensus[-1]

    def via_simulate(W):
        traj = dj.simulate(loss, params, batches, W, optax.sgd(0.2), record=False,
                           consensus=True)
        return jnp.sum(traj.metrics["loss"]) + traj.metrics["consensus"][-1]

    np.testing.assert_allclose(jax.jit(jax.grad(final_loss))(W), jax.grad(via_simulate)(W),
                               rtol=1e-12, atol=1e-15)


def test_from_run_and_atc_validate_their_inputs():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    sim = dj.atc(loss, optax.sgd(0.1), dj.topology.ring(4))
    state = sim.init(params)
    _, outs = dj.run(sim, state, batches, record=True)
    with pytest.raises(ValueError, match="batches: required"):
        dj.Trajectory.from_run(sim, state, outs)
    with pytest.raises(ValueError, match="batches: leading axes"):
        dj.Trajectory.from_run(sim, state, outs, jax.tree.map(lambda x: x[:2], batches))
    with pytest.raises(ValueError, match="gates: leading axes"):
        dj.Trajectory.from_run(sim, state, outs, batches, jnp.ones((3, 5)))
    _, lean = dj.run(sim, state, batches)
    with pytest.raises(ValueError, match="final_state: required"):
        dj.Trajectory.from_run(sim, state, lean)
    with pytest.raises(ValueError, match="outputs: empty"):
        dj.Trajectory.from_run(sim, state, [], batches)
    with pytest.raises(ValueError, match="sim: must be"):
        dj.Trajectory.from_run("sim", state, outs, batches)
    with pytest.raises(ValueError, match="loss_fn: must be callable"):
        dj.atc(3, optax.sgd(0.1), np.eye(4))
    with pytest.raises(ValueError, match="optimizer"):
        dj.atc(loss, "sgd", np.eye(4))
    with pytest.raises(ValueError, match="mixer: required"):
        dj.atc(loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="topo"):
        dj.atc(loss, optax.sgd(0.1), np.ones((4, 4)))  # rows sum to 4
    with pytest.raises(ValueError, match="gossip_model_state"):
        dj.atc(loss, optax.sgd(0.1), np.eye(4), gossip_model_state=True)
    with pytest.raises(ValueError, match="model_state: required"):
        dj.atc(loss, optax.sgd(0.1), np.eye(4), stateful=True).init(params)
    with pytest.raises(ValueError, match="key: required"):
        dj.atc(loss, optax.sgd(0.1), np.eye(4), rng=True).init(params)
    with pytest.raises(ValueError, match="key: given"):
        sim.init(params, key=jax.random.PRNGKey(0))


# --------------------------------------------------------------------------------------------
# aux outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_with_aux_outputs(rng):
    loss, params, batches, probe = make_problem(n=5, steps=5, model="tanh")

    def with_aux(p, b):
        value = loss(p, b)
        return value, {"twice": 2 * value, "y_sum": jnp.sum(b["y"])}

    W = random_stochastic(5, rng)
    plain = dj.simulate(loss, params, batches, W)
    traj = dj.simulate(with_aux, params, batches, W, has_aux=True, eval_batch=probe,
                       eval_every=2)
    _assert_trees_equal(plain.states, traj.states)
    aux = traj.metrics["aux"]
    np.testing.assert_array_equal(aux["twice"], 2 * traj.metrics["loss"])
    np.testing.assert_array_equal(aux["y_sum"], np.asarray(batches["y"]).sum(-1))
    ev = traj.metrics["eval"]
    np.testing.assert_array_equal(ev["step"], [2, 4])
    for i, t in enumerate((2, 4)):
        want = [loss(jax.tree.map(lambda x, t=t, k=k: x[t, k], traj.params), probe)
                for k in range(5)]
        np.testing.assert_allclose(ev["loss"][i], want, rtol=1e-12)
    for fn in (di.dice_gt, di.dice_e):
        np.testing.assert_array_equal(fn(with_aux, traj, probe, 1, 2), fn(loss, plain, probe, 1, 2))
    np.testing.assert_array_equal(di.proximal(with_aux, traj, probe, 2),
                                  di.proximal(loss, plain, probe, 2))
    with pytest.raises(ValueError, match="per-sample"):
        di.dice_e_per_sample(with_aux, traj, probe, 0)


# --------------------------------------------------------------------------------------------
# A brute-force twin for stateful / random losses: explicit loops over steps and nodes
# --------------------------------------------------------------------------------------------


def _dropout_loss(params, batch, key):
    """tanh MLP with dropout on the hidden layer; deterministic when key is None."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    if key is not None:
        keep = jax.random.bernoulli(key, 0.7, h.shape)
        h = jnp.where(keep, h / 0.7, 0.0)
    logp = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def _stateful_loss(params, state, batch):
    """Inputs centred by a running mean (BatchNorm-like statistics, non-trainable)."""
    x = batch["x"] - state["mean"]
    logp = jax.nn.log_softmax(x @ params["w"] + params["b"])
    loss = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
    new = {"mean": 0.8 * state["mean"] + 0.2 * jnp.mean(batch["x"], axis=0),
           "count": state["count"] + 1.0}
    return loss, new


_NODE_UPDATES: dict = {}


def _node_update(parts, optimizer):
    """One node's gated local update, jitted once per loss and optimizer (the loops stay
    explicit; only the per-node arithmetic is compiled)."""
    key_ = (parts, optimizer)
    if key_ not in _NODE_UPDATES:
        def update(p, s, b, key, o, a):
            (_, new_s), g = jax.value_and_grad(lambda q: parts(q, s, b, key), has_aux=True)(p)
            upd, new_o = optimizer.update(g, o, p)
            half = jax.tree.map(lambda x, u: x + a * u, p, upd)
            half_s = jax.tree.map(lambda old, new: old + a * (new - old), s, new_s)
            # a gated update gates its optimizer state alike (integer leaves: kept at a = 0)
            o = jax.tree.map(lambda old, new: old + a * (new - old) if jnp.issubdtype(
                jnp.result_type(new), jnp.inexact) else jnp.where(a == 0, old, new), o, new_o)
            return half, half_s, o

        _NODE_UPDATES[key_] = jax.jit(update)
    return _NODE_UPDATES[key_]


def _explicit_run(parts, optimizer, params, ms, batches, matrices, keys=None, gossip=False,
                  drop=None, gate_at=None, opt=None):
    """Explicit loops over steps and nodes; ``parts(p, s, b, key) -> (loss, new_s)``.
    ``drop``: the source whose update (parameters, optimizer and model state) at the first
    step is removed; ``gate_at``: ``(j, alpha)`` scales it instead. Returns per-step lists of
    (params, model state)."""
    n = len(params)
    opt = [optimizer.init(p) for p in params] if opt is None else opt
    update = _node_update(parts, optimizer)
    out = []
    for s, W in enumerate(np.asarray(matrices)):
        half, half_s, new_opt = [], [], []
        for k in range(n):
            b = jax.tree.map(lambda x, s=s, k=k: x[s, k], batches)
            key = None if keys is None else keys[s][k]
            a = 1.0
            if s == 0 and k == drop:
                a = 0.0
            if gate_at is not None and s == 0 and k == gate_at[0]:
                a = gate_at[1]
            h, hs, o = update(params[k], ms[k], b, key, opt[k], a)
            half.append(h)
            half_s.append(hs)
            new_opt.append(o)

        def mix(trees, W=W):
            def row(k, *leaves):
                return sum(W[k, j] * leaves[j] for j in range(n))

            return [jax.tree.map(lambda *leaves, k=k: row(k, *leaves), *trees) for k in range(n)]

        params = mix(half)
        ms = mix(half_s) if gossip else half_s
        opt = new_opt
        out.append((params, ms))
    return out


def _node_list(tree, t=None, n=4):
    sel = (lambda x, k: x[t, k]) if t is not None else (lambda x, k: x[k])
    return [jax.tree.map(lambda x, k=k: sel(x, k), tree) for k in range(n)]


def _brute_gt(parts, probe_fn, traj, probe, t, hops, keys=None, gossip=False, eps=None):
    """Exact GT cascade [r, k, j] by explicit re-runs (or, with ``eps``, the central
    finite difference of the gate: the first-order cascade)."""
    n, q = traj.num_nodes, 1.0 / traj.num_nodes
    params = _node_list(traj.params, t, n)
    ms = [None] * n if traj.model_states is None else _node_list(traj.model_states, t, n)
    opt, opt0 = traj.optimizer, _node_list(traj.opt_states, t, n)
    batches = jax.tree.map(lambda x: x[t : t + hops], traj.batches)
    mats = np.asarray(traj.matrices(t, t + hops))
    ks = None if keys is None else keys[t : t + hops]

    probe_jit = jax.jit(probe_fn)

    def losses(run):
        return np.array([[probe_jit(p, s, probe) for p, s in zip(*step, strict=True)]
                         for step in run])

    base = losses(_explicit_run(parts, opt, params, ms, batches, mats, ks, gossip, opt=opt0))
    out = np.zeros((hops, n, n))
    for j in range(n):
        if eps is None:
            alt = losses(_explicit_run(parts, opt, params, ms, batches, mats, ks, gossip, drop=j,
                                       opt=opt0))
            out[:, :, j] = q * (base - alt)
        else:
            up = losses(_explicit_run(parts, opt, params, ms, batches, mats, ks, gossip,
                                      gate_at=(j, 1 + eps), opt=opt0))
            dn = losses(_explicit_run(parts, opt, params, ms, batches, mats, ks, gossip,
                                      gate_at=(j, 1 - eps), opt=opt0))
            out[:, :, j] = q * (up - dn) / (2 * eps)
    return out


# --------------------------------------------------------------------------------------------
# per-step PRNG keys (dropout)
# --------------------------------------------------------------------------------------------


def test_dropout_keys_per_node_and_step_and_influence_replays_them(rng):
    _, params, batches, probe = make_problem(n=4, steps=5, model="tanh")
    W = random_stochastic(4, rng)
    key = jax.random.PRNGKey(7)
    opt = optax.sgd(0.2)
    traj = dj.simulate(_dropout_loss, params, batches, W, opt, key=key)
    keys = [[jax.random.fold_in(jax.random.fold_in(key, t), k) for k in range(4)]
            for t in range(5)]

    def parts(p, s, b, k):
        return _dropout_loss(p, b, k), s

    run = _explicit_run(parts, opt, _node_list(params), [None] * 4, batches,
                        np.stack([W] * 5), keys)
    for t, (p, _) in enumerate(run):
        _assert_trees_close(jax.tree.map(lambda *xs: jnp.stack(xs), *p),
                            jax.tree.map(lambda x, t=t: x[t + 1], traj.params), rtol=1e-10)
    # a different key gives a different run; no key = deterministic = no dropout
    other = dj.simulate(_dropout_loss, params, batches, W, opt, key=jax.random.PRNGKey(8))
    assert not np.allclose(other.final_params["w1"], traj.final_params["w1"])
    # the probe loss is deterministic (key=None), re-runs reuse the run's keys
    probe_fn = lambda p, s, b: _dropout_loss(p, b, None)  # noqa: E731
    want = _brute_gt(parts, probe_fn, traj, probe, 1, 2, keys)
    cas = di.gt_cascade(_dropout_loss, traj, probe, 1, 2)
    np.testing.assert_allclose(cas.matrix, want, rtol=1e-8, atol=1e-14)
    first_order = _brute_gt(parts, probe_fn, traj, probe, 1, 2, keys, eps=1e-5)
    np.testing.assert_allclose(di.e_cascade(_dropout_loss, traj, probe, 1, 2).matrix,
                               first_order, rtol=1e-6, atol=1e-11)
    # run() carries the key in the state: the same run
    sim = dj.atc(_dropout_loss, opt, W, rng=True)
    final, _ = dj.run(sim, sim.init(params, key=key), batches)
    _assert_trees_equal(final.params, traj.final_params)


# --------------------------------------------------------------------------------------------
# non-trainable model state (BatchNorm-like statistics)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("gossip", [False, True])
def test_model_state_local_or_gossiped_equals_explicit_loop_and_influence(gossip, rng):
    _, params, batches, probe = make_problem(n=4, steps=5, model="softmax")
    ms = {"mean": jnp.asarray(rng.normal(size=(4, 4)) * 0.3), "count": jnp.zeros((4,))}
    W = random_stochastic(4, rng)
    opt = optax.adam(0.05)
    traj = dj.simulate(_stateful_loss, params, batches, W, opt, model_state=ms,
                       gossip_model_state=gossip)

    def parts(p, s, b, k):
        return _stateful_loss(p, s, b)

    run = _explicit_run(parts, opt, _node_list(params), _node_list(ms), batches,
                        np.stack([W] * 5), gossip=gossip)
    for t, (p, s) in enumerate(run):
        stack = lambda xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)  # noqa: E731
        _assert_trees_close(stack(p), jax.tree.map(lambda x, t=t: x[t + 1], traj.params),
                            rtol=1e-10)
        _assert_trees_close(stack(s), jax.tree.map(lambda x, t=t: x[t + 1], traj.model_states),
                            rtol=1e-10)
    np.testing.assert_allclose(traj.model_states["count"][-1], 5.0)
    probe_fn = lambda p, s, b: _stateful_loss(p, s, b)[0]  # noqa: E731
    want = _brute_gt(parts, probe_fn, traj, probe, 1, 3, gossip=gossip)
    cas = di.gt_cascade(_stateful_loss, traj, probe, 1, 3)
    np.testing.assert_allclose(cas.matrix, want, rtol=1e-8, atol=1e-14)
    first_order = _brute_gt(parts, probe_fn, traj, probe, 1, 3, gossip=gossip, eps=1e-5)
    est = di.e_cascade(_stateful_loss, traj, probe, 1, 3)
    np.testing.assert_allclose(est.matrix, first_order, rtol=1e-6, atol=1e-11)
    # the proximal influence is the first hop of the cascade, model state included
    np.testing.assert_allclose(di.proximal(_stateful_loss, traj, probe, 1), est.matrix[0],
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(di.dice_e_network(_stateful_loss, traj, probe, 1, 3),
                               est.network(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(
        di.trajectory_attribution(_stateful_loss, traj, probe)[1],
        di.dice_e_network(_stateful_loss, traj, probe, 1, 4), rtol=1e-10, atol=1e-15)


@pytest.mark.slow
def test_flax_batchnorm_with_dropout_through_simulate_run_and_influence(rng):
    """A flax model with BatchNorm statistics (model state) and dropout (keys): training mode
    when a key is given, evaluation mode (running averages) when the key is None."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(6)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
            x = nn.Dropout(0.2, deterministic=not train)(nn.tanh(x))
            return nn.Dense(3)(x)

    model = Net()
    x0 = jnp.zeros((3, 4))
    variables = jax.vmap(lambda k: model.init({"params": k}, x0, train=False))(
        jax.random.split(jax.random.PRNGKey(0), 4))
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(params, stats, batch, key):
        variables = {"params": params, "batch_stats": stats}
        if key is None:  # evaluation (probe) mode: running averages, no dropout
            logits, new_stats = model.apply(variables, batch["x"], train=False), stats
        else:
            logits, new = model.apply(variables, batch["x"], train=True,
                                      rngs={"dropout": key}, mutable=["batch_stats"])
            new_stats = new["batch_stats"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1)), new_stats

    _, _, batches, probe = make_problem(n=4, steps=4)
    W = random_stochastic(4, rng)
    key = jax.random.PRNGKey(3)
    traj = dj.simulate(loss_fn, params, batches, W, optax.sgd(0.1), model_state=stats, key=key)
    assert not np.allclose(traj.model_states["BatchNorm_0"]["mean"][0],
                           traj.model_states["BatchNorm_0"]["mean"][-1])
    sim = dj.atc(loss_fn, optax.sgd(0.1), W, stateful=True, rng=True)
    final, _ = dj.run(sim, sim.init(params, stats, key), batches)
    _assert_trees_equal(final, traj.final_state)
    gt = di.dice_gt(loss_fn, traj, probe, 1, 2)
    est = di.dice_e(loss_fn, traj, probe, 1, 2, order=2, direct="exact")
    assert gt.shape == (4,) and bool(jnp.all(jnp.isfinite(est)))
    assert np.corrcoef(gt, est)[0, 1] > 0.9  # small steps: the estimate tracks the exact one


@pytest.mark.slow
def test_deprecated_names_warn_and_equal_their_replacements(rng):
    from dicejax import topology_opt as to
    from dicejax.apps import contribution as ct

    loss, params, batches, probe = make_problem(n=4, steps=4)
    W = jnp.asarray(random_stochastic(4, rng))
    traj = dj.simulate(loss, params, batches, W)
    with pytest.warns(DeprecationWarning, match="hops="):
        old = di.dice_e_network(loss, traj, probe, 1, horizon=2)
    np.testing.assert_array_equal(old, di.dice_e_network(loss, traj, probe, 1, hops=2))
    with pytest.warns(DeprecationWarning, match="hops="):
        old = di.dice_gt_network(loss, traj, probe, 1, horizon=2)
    np.testing.assert_array_equal(old, di.dice_gt_network(loss, traj, probe, 1, hops=2))
    cas = di.e_cascade(loss, traj, probe, 1, 2)
    with pytest.warns(DeprecationWarning):
        np.testing.assert_array_equal(cas.network(horizon=1), cas.network(1))
    with pytest.raises(ValueError, match="hops and horizon"):
        di.dice_e_network(loss, traj, probe, 1, hops=1, horizon=2)
    with pytest.warns(DeprecationWarning, match="dice_e_per_sample"):
        old = di.per_sample(loss, traj, probe, 1, 2)
    np.testing.assert_array_equal(old, di.dice_e_per_sample(loss, traj, probe, 1, 2))
    problem = to.Problem.create(loss, params, batches, probe)
    with pytest.warns(DeprecationWarning, match="run_with"):
        old = to.rollout(W, problem)
    _assert_trees_equal(old, to.run_with(W, problem))
    with pytest.warns(DeprecationWarning, match="whole_run_influence"):
        old = to.contributions(W, problem)
    np.testing.assert_array_equal(old, to.whole_run_influence(W, problem))
    prox = di.proximal(loss, traj, probe, 1)
    with pytest.warns(DeprecationWarning, match="reciprocity_summary"):
        old = ct.reciprocity(prox)
    _assert_trees_equal(old, ct.reciprocity_summary(prox))
