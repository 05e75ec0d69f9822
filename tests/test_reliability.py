"""Reliability: determinism, hostile input, divergence, and property-based invariants.

The bad-input table extends DESIGN §3: every entry must raise a ``ValueError`` whose message
names the argument. Entries marked ``xfail(strict=True)`` are known gaps (they raise
something else, or nothing); fixing one turns its test into an XPASS, which fails the suite
until the mark is removed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dicejax as dj
from conftest import make_problem, softmax_loss
from dicejax import topology as tp
from dicejax.simulate import final_state, raise_if_diverged

# --------------------------------------------------------------------------------------------
# (a) Determinism
# --------------------------------------------------------------------------------------------


def _digest(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_same_seed_gives_bitwise_identical_training():
    """Two independent builds and runs (each compiled afresh: new loss_fn closures)."""
    from dicejax.experiments.common import RunConfig, build

    def config(seed):
        return RunConfig(nodes=4, steps=8, batch=8, eval_every=4, test_size=30, probe_size=8,
                         samples_per_node=48, seed=seed, optimizer="adam", lr=0.01,
                         same_init=False, topology="erdos_renyi")

    def train(seed):
        s = build(config(seed))
        traj = dj.simulate(s.loss_fn, s.params, s.batches, s.topology, s.optimizer,
                           record=True, eval_batch=s.test, eval_fn=s.eval_fn, eval_every=4)
        return s, traj

    (s1, t1), (s2, t2) = train(0), train(0)
    assert _digest((s1.params, s1.batches, s1.topology.matrix, s1.probe)) == _digest(
        (s2.params, s2.batches, s2.topology.matrix, s2.probe))
    assert _digest(t1) == _digest(t2)  # every recorded state, metric and evaluation
    other = build(config(1))
    assert _digest(other.params) != _digest(s1.params)
    assert _digest(other.batches) != _digest(s1.batches)


def test_influence_is_deterministic():
    loss, _, _, probe, _, traj = _ctx()
    for fn in (dj.influence.dice_gt, dj.influence.dice_e):
        assert _digest(fn(loss, traj, probe, step=0, hops=2)) == _digest(
            fn(loss, traj, probe, step=0, hops=2))


# --------------------------------------------------------------------------------------------
# (b) Hostile input: each a ValueError naming the argument
# --------------------------------------------------------------------------------------------


@functools.cache
def _ctx():
    loss, params, batches, probe = make_problem(n=4, steps=3)
    topo = tp.ring(4)
    traj = dj.simulate(loss, params, batches, topo)
    return loss, params, batches, probe, topo, traj


def _sim(**kw):
    loss, params, batches, _, topo, _ = _ctx()
    args = dict(loss_fn=loss, params=params, batches=batches, topo=topo)
    return dj.simulate(**{**args, **kw})


def _infl(fn, **kw):
    loss, _, _, probe, _, traj = _ctx()
    args = dict(loss_fn=loss, traj=traj, probe=probe, step=0)
    return getattr(dj.influence, fn)(**{**args, **kw})


def _params(fn):
    return lambda: _sim(params=jax.tree.map(fn, _ctx()[1]))


def _batches(fn):
    return lambda: _sim(batches=fn(_ctx()[2]))


def _probe(fn):
    return lambda: fn(_ctx()[3])


INFLUENCE = ("dice_e", "dice_gt", "proximal")

BAD_INPUT = [
    # wrong dtypes
    ("complex matrix", lambda: _sim(topo=np.eye(4).astype(complex)), "topo: .*real numeric"),
    ("string matrix", lambda: _sim(topo=np.full((4, 4), "a")), "topo: .*real numeric"),
    ("object matrix", lambda: _sim(topo=np.full((4, 4), None)), "topo: .*real numeric"),
    ("string topo", lambda: _sim(topo="ring"), "topo: .*2 axes"),
    ("float step", lambda: _infl("dice_e", step=1.0), "step: must be a local step index"),
    ("float hops", lambda: _infl("dice_gt", hops=1.5), "hops: must be a positive integer"),
    ("float chunk_steps", lambda: _sim(chunk_steps=1.5), "chunk_steps"),
    ("string mixing", lambda: _sim(mixing="fast"), "mixing"),
    ("float replicate n", lambda: dj.replicate({"a": jnp.ones(2)}, 2.0), "n: must be"),
    # empty graphs (n = 0)
    ("n=0 matrix", lambda: _sim(topo=np.zeros((0, 0))), "topo: .*at least one node"),
    ("n=0 from_matrix", lambda: tp.from_matrix(np.zeros((0, 0))), "at least one node"),
    ("n=0 from_adjacency", lambda: tp.from_adjacency(np.zeros((0, 0))), "at least one node"),
    ("n=0 from_networkx", lambda: tp.from_networkx(nx.Graph()), "at least one node"),
    ("n=0 ring", lambda: tp.ring(0), "ring: n must be an integer >= 1"),
    ("n=0 exponential", lambda: tp.exponential(0), "exponential: n"),
    ("n=0 complete", lambda: tp.complete(0), "complete: n"),
    ("n=0 replicate", lambda: dj.replicate({"a": jnp.ones(2)}, 0), "n: must be"),
    ("n=0 params", _params(lambda x: x[:0]), "topo: matrix is for 4 nodes but params have n=0"),
    # disconnected graphs from builders that promise connectivity
    ("erdos_renyi p=0", lambda: tp.erdos_renyi(6, 0.0, max_tries=3), "erdos_renyi: no connected"),
    ("random_regular d=1", lambda: tp.random_regular(6, 1), "random_regular: .*never connected"),
    ("random_regular d=0", lambda: tp.random_regular(4, 0), "random_regular: .*never connected"),
    ("by_name disconnected", lambda: tp.by_name("erdos_renyi", 8, p=0.0, max_tries=2),
     "erdos_renyi: no connected"),
    # T = 0
    ("T=0 batches", _batches(lambda b: jax.tree.map(lambda x: x[:0], b)), "batches: T = 0"),
    ("T=0 iterator", _batches(lambda b: iter([])), "batches: .*no chunks"),
    ("T=0 chunk", _batches(lambda b: iter([jax.tree.map(lambda x: x[:0], b)])), "T = 0"),
    ("T=0 schedule", lambda: _sim(topo=np.zeros((0, 4, 4))), "topo: .*at least one step"),
    ("T=0 node_batches", lambda: dj.data.node_batches(
        np.zeros((20, 2)), np.zeros(20, int), [np.arange(10), np.arange(10, 20)], 0, 2),
     "steps must be a positive integer"),
    # batch pytrees whose leaves disagree
    ("leaves disagree on T", _batches(lambda b: {"x": b["x"], "y": b["y"][:2]}),
     r"batches: leaves disagree on the leading axes \[T, n\]"),
    ("leaves disagree on n", _batches(lambda b: {"x": b["x"], "y": b["y"][:, :3]}),
     "batches: leaves disagree"),
    ("chunk leaves disagree", _batches(lambda b: iter([{"x": b["x"], "y": b["y"][:2]}])),
     "batches: leaves disagree"),
    ("chunk of wrong n", _batches(lambda b: iter([jax.tree.map(lambda x: x[:, :3], b)])),
     "batches: .*params have n=4"),
    ("scalar batch leaf", _batches(lambda b: {"x": b["x"], "y": jnp.asarray(1)}),
     r"batches: every leaf needs leading axes \[T, n"),
    ("empty batch pytree", _batches(lambda b: {}), "batches: must be a pytree"),
    ("params disagree on n", _params(lambda x: x[:3] if x.ndim == 2 else x),
     "params: leaves disagree"),
    # non-finite matrices and parameters
    ("nan matrix", lambda: _sim(topo=np.where(np.eye(4) > 0, np.nan, 0.0)), "topo: .*non-finite"),
    ("inf matrix", lambda: _sim(topo=np.where(np.eye(4) > 0, np.inf, 0.0)), "topo: .*non-finite"),
    ("nan schedule", lambda: _sim(topo=np.stack([np.eye(4), np.full((4, 4), np.nan)])),
     r"topo: .*non-finite entry nan at \[1, 0, 0\]"),
    ("inf Topology", lambda: tp.Topology(np.full((2, 2), np.inf)), "non-finite"),
    ("nan params", _params(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)), "params: .*non-finite"),
    ("not square", lambda: _sim(topo=np.ones((4, 3)) / 3), "topo: .*square"),
    ("negative entry", lambda: _sim(topo=np.array(
        [[1.5, -0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "topo: negative"),
    ("rows not summing to 1", lambda: _sim(topo=np.full((4, 4), 0.3)), "topo: row 0 sums"),
]
for fn in INFLUENCE:
    BAD_INPUT += [
        # probe sets of the wrong shape
        (f"{fn} probe feature dim", _probe(lambda p, fn=fn: _infl(
            fn, probe={"x": p["x"][:, :3], "y": p["y"]})), "probe: "),
        (f"{fn} probe per-node axis", _probe(lambda p, fn=fn: _infl(
            fn, probe=jax.tree.map(lambda x: jnp.stack([x] * 4), p))), "probe: "),
        (f"{fn} probe x/y disagree", _probe(lambda p, fn=fn: _infl(
            fn, probe={"x": p["x"], "y": p["y"][:5]})), "probe: "),
        (f"{fn} probe missing key", _probe(lambda p, fn=fn: _infl(fn, probe={"x": p["x"]})),
         "probe: "),
        # node_weights wrong
        (f"{fn} node_weights length", functools.partial(_infl, fn, node_weights=jnp.ones(5)),
         r"node_weights: must have shape \(4,\)"),
        (f"{fn} node_weights 2-D", functools.partial(_infl, fn, node_weights=jnp.ones((4, 1))),
         r"node_weights: must have shape \(4,\)"),
        (f"{fn} node_weights negative", functools.partial(
            _infl, fn, node_weights=-jnp.ones(4)), "node_weights: must be finite"),
        (f"{fn} node_weights nan", functools.partial(
            _infl, fn, node_weights=jnp.full(4, jnp.nan)), "node_weights: must be finite"),
        (f"{fn} step out of range", functools.partial(_infl, fn, step=3), "step: "),
    ]


@pytest.mark.parametrize(("fn", "match"), [pytest.param(f, m, id=i) for i, f, m in BAD_INPUT])
def test_bad_input_raises_value_error_naming_the_argument(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()



MORE_BAD_INPUT = [
    pytest.param(_params(lambda x: x.astype(jnp.int32)), "params: .*(integer|floating|dtype)",
                 id="integer params"),
    pytest.param(_params(lambda x: x > 0), "params: .*(bool|floating|dtype)", id="bool params"),
    pytest.param(_params(lambda x: x.astype(jnp.complex128)), "params: .*(complex|floating)",
                 id="complex params"),
    pytest.param(lambda: _sim(params={"w": np.full((4, 2), "a"), "b": _ctx()[1]["b"]}),
                 "params: ", id="string params"),
    pytest.param(lambda: _sim(optimizer=0.1), "optimizer: ", id="optimizer not optax"),
    pytest.param(lambda: _sim(loss_fn=lambda p, b: p["w"].sum(0)), "loss_fn: .*scalar",
                 id="loss_fn not scalar"),
    pytest.param(lambda: _sim(update_scale="ones"), "update_scale: ", id="update_scale string"),
    pytest.param(lambda: _sim(chunk_steps=True), "chunk_steps: ", id="chunk_steps=True"),
    pytest.param(lambda: _sim(eval_every=True, eval_batch=_ctx()[3]), "eval_every: ",
                 id="eval_every=True"),
]
for fn in INFLUENCE:
    MORE_BAD_INPUT += [
        pytest.param(_probe(lambda p, fn=fn: _infl(fn, probe=jax.tree.map(lambda x: x[:0], p))),
                     "probe: ", id=f"{fn} empty probe"),
        pytest.param(_probe(lambda p, fn=fn: _infl(
            fn, probe={"x": p["x"].at[0, 0].set(jnp.nan), "y": p["y"]})), "probe: .*finite",
                     id=f"{fn} non-finite probe"),
        pytest.param(functools.partial(_infl, fn, node_weights="uniform"), "node_weights: ",
                     id=f"{fn} node_weights string"),
    ]
    if fn != "proximal":
        MORE_BAD_INPUT += [
            pytest.param(functools.partial(_infl, fn, step=True), "step: ",
                         id=f"{fn} step=True"),
            pytest.param(functools.partial(_infl, fn, hops=True), "hops: ",
                         id=f"{fn} hops=True"),
        ]


@pytest.mark.parametrize(("fn", "match"), MORE_BAD_INPUT)
def test_more_bad_input_raises_value_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


# --------------------------------------------------------------------------------------------
# (c) Divergence
# --------------------------------------------------------------------------------------------


def clock_problem(n=4, steps=6, diverge_node=2, diverge_step=3, where="loss"):
    """A run (``optax.sgd(1.0)``, identity mixing) that diverges at a known (step, node).

    A per-node clock ``c`` gains exactly 1 per step (its gradient is -1); node
    ``diverge_node`` starts one tick ahead, so it alone reaches the threshold at global step
    ``diverge_step``. ``where="loss"``: the train loss turns NaN there (parameters stay
    finite); ``where="params"``: the loss stays finite but the gradient is NaN, so the
    parameters turn NaN after that step.
    """
    loss, params, batches, _ = make_problem(n=n, steps=steps)
    clock = np.zeros(n)
    clock[diverge_node] = 1.0
    threshold = diverge_step + 1.0

    def clock_loss(p, b):
        c = p["c"]
        if where == "loss":
            return loss(p, b) - c + jnp.where(c >= threshold, jnp.nan, 0.0)
        return loss(p, b) - c + 0.0 * jnp.sqrt(jnp.maximum(threshold - c, 0.0))

    return clock_loss, {**params, "c": jnp.asarray(clock)}, batches


@pytest.mark.parametrize("chunking", ["one scan", "chunk_steps", "iterator"])
def test_divergence_in_second_chunk_names_global_step_and_node(chunking):
    loss, params, batches = clock_problem(diverge_node=2, diverge_step=3)
    kw = {}
    if chunking == "chunk_steps":
        kw["chunk_steps"] = 2  # steps 2, 3 are the second chunk
    elif chunking == "iterator":
        batches = iter([jax.tree.map(lambda x, a=a: x[a : a + 2], batches) for a in (0, 2, 4)])
    with pytest.raises(FloatingPointError, match=r"node 2 is nan at step 3;"):
        dj.simulate(loss, params, batches, np.eye(4), optax.sgd(1.0), **kw)


def test_divergence_of_resumed_run_names_global_step():
    loss, params, batches = clock_problem(diverge_node=1, diverge_step=4)
    first = dj.simulate(loss, params, jax.tree.map(lambda x: x[:3], batches), np.eye(4),
                        optax.sgd(1.0))
    with pytest.raises(FloatingPointError, match=r"node 1 is nan at step 4;"):
        dj.simulate(loss, None, jax.tree.map(lambda x: x[3:], batches), np.eye(4),
                    optax.sgd(1.0), initial_state=final_state(first))


@pytest.mark.parametrize("chunk_steps", [None, 2])
def test_parameter_divergence_names_first_step_and_node(chunk_steps):
    loss, params, batches = clock_problem(diverge_node=2, diverge_step=3, where="params")
    with pytest.raises(FloatingPointError) as err:
        dj.simulate(loss, params, batches, np.eye(4), optax.sgd(1.0), chunk_steps=chunk_steps)
    assert "node 2" in str(err.value) and "step 3" in str(err.value), str(err.value)


@pytest.mark.parametrize("chunk_steps", [None, 4, 2])
def test_divergence_spread_by_gossip_is_traced_to_its_first_node(chunk_steps):
    # node 2 listens only to itself, nodes 1 and 3 listen to it: its NaN update at step 3
    # reaches their parameters at step 4, so the losses alone would blame node 1 at step 4.
    # simulate checks chunk ends (chunk_steps=4: step 3 is the chunk's last) and replays a
    # diverged chunk with per-step flags; the message equals the per-step flags' one.
    loss, params, batches = clock_problem(diverge_node=2, diverge_step=3, where="params")
    w = np.array([[.5, 0, 0, .5], [0, .5, .5, 0], [0, 0, 1, 0], [0, 0, .5, .5]])
    sim = dj.atc(loss, optax.sgd(1.0), w)  # per-step flags (finite=True is the default)
    _, outs = dj.run(sim, sim.init(params), batches)
    assert not np.isfinite(np.asarray(outs.loss[4, [1, 2, 3]])).any()
    with pytest.raises(FloatingPointError) as flags:
        raise_if_diverged(outs.loss, outs.finite, 0)
    assert "node 2 became non-finite at step 3 (nodes [2])" in str(flags.value)
    with pytest.raises(FloatingPointError) as err:
        dj.simulate(loss, params, batches, w, optax.sgd(1.0), chunk_steps=chunk_steps)
    assert str(err.value) == str(flags.value)


def test_fast_chunks_report_no_flags_and_the_same_run():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    sim = dj.atc(loss, optax.sgd(0.1), tp.ring(4), finite=False)
    state, outs = dj.run(sim, sim.init(params), batches)
    assert outs.finite is None
    ref, ref_outs = dj.run(sim.replace(finite=True), sim.init(params), batches)
    assert ref_outs.finite.shape == (3, 4) and bool(ref_outs.finite.all())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="finite"):
        dj.atc(loss, optax.sgd(0.1), tp.ring(4), finite=1)


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_isolating_gossip_equals_explicit_loops(method):
    # two steps of a time-varying graph: node 3 listens to node 1 at step 0 only, so at
    # step 1 the sparse list holds a zero-weight slot pointing at the non-finite node 1
    n = 6
    w = np.zeros((2, n, n))
    for t in range(2):
        w[t] = np.eye(n) * 0.5 + np.roll(np.eye(n), 1, axis=1) * 0.5  # k hears k+1
    w[0, 3] = 0
    w[0, 3, [1, 3]] = 0.5
    w[1, 0] = 0
    w[1, 0, 0] = 1.0
    mixer = dj.mixing.from_topology(w, method)
    assert mixer.method == method
    x = {"a": np.arange(n * 3, dtype=float).reshape(n, 3), "b": np.ones((n, 2, 2))}
    x["a"][1, 0] = np.nan
    x["b"][4, 1, 1] = np.inf
    finite = np.array([np.all(np.isfinite(x["a"][k])) and np.all(np.isfinite(x["b"][k]))
                       for k in range(n)])
    for t in range(2):
        got = mixer.apply(t, jax.tree.map(jnp.asarray, x), jnp.asarray(finite))
        for k in range(n):
            senders = [j for j in range(n) if w[t, k, j] != 0]
            for name in x:
                if not finite[k] or not all(finite[j] for j in senders):
                    assert np.all(np.isnan(np.asarray(got[name][k]))), (t, k, name)
                else:
                    expected = sum(w[t, k, j] * x[name][j] for j in senders)
                    np.testing.assert_allclose(got[name][k], expected, rtol=1e-15)
    # the plain dense product lets a zero weight carry the NaN: 0 · NaN = NaN
    if method == "dense":
        row0 = np.asarray(mixer.apply(1, jax.tree.map(jnp.asarray, x))["a"][0])
        assert w[1, 0, 1] == 0 and np.isnan(row0[0])
        assert np.isfinite(np.asarray(got["a"][0])).all()


@pytest.mark.parametrize("mixing", ["dense", "sparse"])
def test_isolate_run_leaves_non_listeners_as_if_the_attacker_stayed_finite(mixing):
    # node 2 diverges at step 3; node 3 listens to it, nodes 0 and 1 do not
    w = np.array([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, .5, .5]])
    loss, params, batches = clock_problem(diverge_node=2, diverge_step=3, where="params")
    # the other clocks start far behind: within the 6 steps only node 2 reaches its threshold
    params = {**params, "c": jnp.asarray([-10.0, -10.0, 1.0, -10.0])}
    calm_loss, _, _ = clock_problem(diverge_node=2, diverge_step=100, where="params")
    with pytest.raises(FloatingPointError, match="node 2"):
        dj.simulate(loss, params, batches, w, optax.sgd(1.0), mixing=mixing)
    traj = dj.simulate(loss, params, batches, w, optax.sgd(1.0), mixing=mixing,
                       on_divergence="isolate")
    np.testing.assert_array_equal(traj.diverged, [-1, -1, 3, 4])
    assert traj.metrics["finite"].shape == (6, 4)
    calm = dj.simulate(calm_loss, params, batches, w, optax.sgd(1.0), mixing=mixing)
    np.testing.assert_array_equal(calm.diverged, [-1, -1, -1, -1])
    for got, ref in zip(jax.tree.leaves(traj.params), jax.tree.leaves(calm.params), strict=True):
        np.testing.assert_array_equal(got[:, :2], ref[:, :2])  # every step, nodes 0 and 1
        assert np.isnan(np.asarray(got[-1, 2:])).all()
    np.testing.assert_array_equal(traj.metrics["loss"][:, :2], calm.metrics["loss"][:, :2])


def test_on_divergence_validation():
    loss, params, batches = clock_problem()
    with pytest.raises(ValueError, match="on_divergence"):
        dj.simulate(loss, params, batches, np.eye(4), on_divergence="skip")
    with pytest.raises(ValueError, match="on_divergence"):
        dj.simulate(loss, params, batches, np.eye(4), on_divergence="isolate",
                    mesh=dj.parallel.node_mesh())
    with pytest.raises(ValueError, match="isolate"):
        dj.atc(loss, optax.sgd(0.1), np.eye(4), isolate=1)


# --------------------------------------------------------------------------------------------
# (d) Property-based invariants of simulate and of the topology builders
# --------------------------------------------------------------------------------------------

STEPS = 3
SGD0 = optax.sgd(0.0)  # one object: the jit cache is keyed on it, examples reuse compilations


def _row_stochastic(rng, n, steps, density):
    a = rng.uniform(size=(steps, n, n)) * (rng.uniform(size=(steps, n, n)) < density)
    a[:, np.arange(n), rng.integers(0, n, size=n)] += 0.1  # no empty row
    return a / a.sum(-1, keepdims=True)


def _birkhoff(rng, n, steps, terms):
    """Random doubly-stochastic matrices: convex mixtures of permutation matrices."""
    out = np.zeros((steps, n, n))
    for t in range(steps):
        weights = rng.dirichlet(np.ones(terms))
        for w in weights:
            out[t, np.arange(n), rng.permutation(n)] += w
    return out


def _problem(n, seed, same_init):
    _, params, batches, _ = make_problem(n=n, steps=STEPS, seed=seed, same_init=same_init)
    return params, batches


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), density=st.floats(0.05, 1.0),
       static=st.booleans())
def test_row_stochastic_mixing_preserves_consensus(n, seed, density, static):
    rng = np.random.default_rng(seed)
    W = _row_stochastic(rng, n, STEPS, density)
    if static:
        W = np.broadcast_to(W[:1], W.shape)
    params, batches = _problem(n, seed % 1000, same_init=True)
    traj = dj.simulate(softmax_loss, params, batches, W, SGD0, mixing="dense", consensus=True)
    for leaf in jax.tree.leaves(traj.params):
        np.testing.assert_allclose(leaf, np.broadcast_to(leaf[:1, :1], leaf.shape),
                                   rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(traj.metrics["consensus"], 0.0, atol=1e-24)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), terms=st.integers(1, 4))
def test_doubly_stochastic_mixing_preserves_the_average(n, seed, terms):
    rng = np.random.default_rng(seed)
    W = _birkhoff(rng, n, STEPS, terms)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)  # columns too
    params, batches = _problem(n, seed % 1000, same_init=False)
    traj = dj.simulate(softmax_loss, params, batches, W, SGD0, mixing="dense", consensus=True)
    for leaf in jax.tree.leaves(traj.params):
        mean = leaf.mean(1)  # [T+1, ...] node average at every step
        np.testing.assert_allclose(mean, np.broadcast_to(mean[:1], mean.shape),
                                   rtol=1e-12, atol=1e-13)
    consensus = np.asarray(traj.metrics["consensus"])
    assert np.all(np.diff(consensus) <= 1e-12 * (1 + consensus[:-1]))  # never grows


def _check(topo: tp.Topology, n: int, *, doubly: bool, connected: bool = True) -> None:
    assert topo.n == n
    tp.validate_mixing(topo.matrix, atol=1e-12)
    assert topo.is_strongly_connected is connected
    if doubly:
        assert topo.is_doubly_stochastic
    stacked = topo.stacked()
    np.testing.assert_allclose(stacked.sum(-1), 1.0, atol=1e-12)
    assert (stacked >= 0).all()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40))
def test_exponential_property(n):
    topo = tp.exponential(n)
    _check(topo, n, doubly=True)
    offsets = {0} | {2**i % n for i in range(n.bit_length()) if 2**i < n}
    np.testing.assert_array_equal(topo.in_degree, len(offsets) - 1)
    np.testing.assert_array_equal(topo.out_degree, len(offsets) - 1)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 7), wrap=st.booleans())
def test_torus_and_grid_property(rows, cols, wrap):
    topo = (tp.torus if wrap else tp.grid)(rows, cols)
    _check(topo, rows * cols, doubly=True)
    assert topo.is_symmetric
    r, c = np.divmod(np.arange(rows * cols), cols)
    if wrap:
        expect = [len({((r[k] + dr) % rows, (c[k] + dc) % cols) for dr, dc in
                       ((-1, 0), (1, 0), (0, -1), (0, 1))} - {(r[k], c[k])})
                  for k in range(rows * cols)]
    else:
        expect = (r > 0).astype(int) + (r < rows - 1) + (c > 0) + (c < cols - 1)
    np.testing.assert_array_equal(topo.in_degree, expect)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), kind=st.sampled_from(["star", "complete", "hypercube"]))
def test_star_complete_hypercube_property(n, kind):
    if kind == "hypercube":
        dim = n % 6
        topo, n = tp.hypercube(dim), 2**dim
        np.testing.assert_array_equal(topo.in_degree, dim)
    elif kind == "star":
        topo = tp.star(n)
        np.testing.assert_array_equal(topo.in_degree, [n - 1] + [1] * (n - 1))
    else:
        topo = tp.complete(n)
        np.testing.assert_array_equal(topo.in_degree, n - 1)
    _check(topo, n, doubly=True)
    assert topo.is_symmetric


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 33), steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_time_varying_builders_property(n, steps, seed):
    one_peer = tp.one_peer_exponential(n)
    _check(one_peer, n, doubly=True)
    per_step = (one_peer.stacked() > 0).sum(-1) - 1  # in-degree at every step
    np.testing.assert_array_equal(per_step, 0 if n == 1 else 1)
    matching = tp.random_matching(n, steps=steps, seed=seed)
    assert matching.period == steps
    stacked = matching.stacked()
    np.testing.assert_allclose(stacked.sum(-1), 1.0, atol=1e-15)
    np.testing.assert_allclose(stacked.sum(-2), 1.0, atol=1e-15)
    assert ((stacked > 0).sum(-1) - 1 <= 1).all()  # at most one partner per step
    np.testing.assert_array_equal(stacked, np.swapaxes(stacked, 1, 2))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       directed=st.booleans())
def test_from_adjacency_property(n, p, seed, directed):
    rng = np.random.default_rng(seed)
    adj = rng.uniform(size=(n, n)) < p
    np.fill_diagonal(adj, False)
    if not directed:
        adj = np.triu(adj, 1)
        adj = adj | adj.T
    topo = tp.from_adjacency(adj, weights="uniform" if directed else "metropolis_hastings")
    np.testing.assert_array_equal(topo.in_degree, adj.sum(1))
    np.testing.assert_array_equal(topo.out_degree, adj.sum(0))
    graph = nx.from_numpy_array(adj.T.astype(int), create_using=nx.DiGraph)
    _check(topo, n, doubly=not directed, connected=nx.is_strongly_connected(graph))
    if not directed:
        assert topo.is_symmetric and topo.is_doubly_stochastic
