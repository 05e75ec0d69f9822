"""The PyTorch baselines of the benchmarks compute exactly what dicejax computes.

A benchmark against a baseline that computes something else is worthless, so every
baseline in ``benchmarks/torch_baselines.py`` is checked here against dicejax from the same
initial weights, batches and mixing matrix, on tiny float64 problems: the reference-style
per-node loop, stacked ``torch.func`` (dense and neighbour-list gossip), ``torch.compile``
(float32; the tracing that inductor also uses), one-hop DICE-E and walk-enumerated multi-hop
DICE-E with double-backward HVPs (and the network-level reading); and the torch twin of
the GroupNorm ResNet-18 (logits, gradients, weight mapping).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # the benchmarks' baselines: CI runs them with `make test-slow`

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import torch_baselines as tb  # noqa: E402

import dicejax as dj  # noqa: E402
from conftest import random_stochastic  # noqa: E402

SHAPE = (8, 8, 1)
CLASSES = 10


def _model(name):
    if name == "mlp":
        return dj.models.get_model("mlp", CLASSES, hidden=(12, 7))
    return dj.models.get_model("cnn", CLASSES)


def _problem(name, n=4, steps=3, batch=4, seed=0, dtype=jnp.float64):
    """Flax params (independent per node), batches, a directed row-stochastic W, probe."""
    model = _model(name)
    params = dj.models.init_params(model, jax.random.PRNGKey(seed), SHAPE, num_nodes=n,
                                   same_init=False, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, n, batch, *SHAPE))
    y = rng.integers(0, CLASSES, size=(steps, n, batch))
    px, py = rng.normal(size=(9, *SHAPE)), rng.integers(0, CLASSES, size=9)
    w = random_stochastic(n, rng, density=0.5)
    return model, params, x, y, w, (px, py)


def _torch(model, params, x, y, dtype=torch.float64):
    tm = tb.make_torch_model(params, SHAPE).to(dtype)
    return tm, tb.to_torch_params(params, SHAPE, tm, dtype), tb.to_torch_images(x, dtype), \
        tb.to_torch_labels(y)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_layouts_round_trip_and_give_the_same_loss(name):
    model, params, x, y, _, _ = _problem(name)
    tm, tp, xs, ys = _torch(model, params, x, y)
    back = tb.to_flax_params(tp, params, SHAPE, tm)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    loss_fn = dj.models.make_loss_fn(model)
    losses = jax.jit(jax.vmap(loss_fn))(params, {"x": x[0], "y": y[0]})
    for k in range(x.shape[1]):
        ours = losses[k]
        out = torch.func.functional_call(tm, tb.node_params(tp, k), (xs[0, k],))
        theirs = torch.nn.functional.cross_entropy(out, ys[0, k])
        np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_simulators_match_dicejax_from_the_same_weights(name):
    model, params, x, y, w, _ = _problem(name, steps=2)
    traj = dj.simulate(dj.models.make_loss_fn(model), params,
                       {"x": jnp.asarray(x), "y": jnp.asarray(y)}, w, optax.sgd(0.3),
                       record=False)
    want = traj.final_params
    tm, tp, xs, ys = _torch(model, params, x, y)
    ref = tb.ReferenceSim(tm, tp, w, 0.3)
    ref.run(xs, ys)
    results = {"reference": ref.stacked_params()}
    for mixing in ("dense", "sparse"):
        sim = tb.FuncSim(tm, w, 0.3, mixing=mixing, dtype=torch.float64)
        results[f"func-{mixing}"] = sim.run(tp, xs, ys)
    for label, got in results.items():
        diff = tb.max_rel_diff(tb.to_flax_params(got, params, SHAPE, tm), want)
        assert diff < 1e-12, (label, diff)
    # and the weights actually moved (the comparison is not between two copies of θ^0)
    assert tb.max_rel_diff(want, params) > 1e-3


def test_compiled_func_matches_dicejax_in_float32():
    """``torch.compile`` tracing (dynamo + AOT autograd of ``vmap(grad)``) keeps the math.

    The ``aot_eager`` backend traces exactly like inductor but skips its C++ code generation
    (a minute of compiling on a 2-core CPU); the benchmarks check the inductor-compiled
    step against dicejax before every timing.
    """
    model, params, x, y, w, _ = _problem("mlp", steps=3, dtype=jnp.float32)
    x, y = x.astype(np.float32), y
    traj = dj.simulate(dj.models.make_loss_fn(model), params,
                       {"x": jnp.asarray(x), "y": jnp.asarray(y)}, w.astype(np.float32),
                       optax.sgd(0.3), record=False)
    tm, tp, xs, ys = _torch(model, params, x, y, torch.float32)
    sim = tb.FuncSim(tm, w, 0.3, compile="aot_eager")
    got = tb.to_flax_params(sim.run(tp, xs, ys), params, SHAPE, tm)
    assert tb.max_rel_diff(got, traj.final_params) < 1e-5


@pytest.fixture(scope="module")
def recorded():
    """A float64 run recorded by both frameworks from the same weights (5 steps, n=5), and
    dicejax's three-hop DICE-E cascade at step 1 (what ``dice_e`` and ``dice_e_network``
    reduce: ``dice_e(hops=r) = direct + Σ_{s ≤ r} per_hop[s-1]``,
    ``dice_e_network(horizon=h) = network(h)``)."""
    model, params, x, y, w, (px, py) = _problem("mlp", n=5, steps=5)
    loss_fn = dj.models.make_loss_fn(model)
    traj = dj.simulate(loss_fn, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, w,
                       optax.sgd(0.3), record=True)
    tm, tp, xs, ys = _torch(model, params, x, y)
    sim = tb.ReferenceSim(tm, tp, w, 0.3, record=True)
    sim.run(xs, ys)
    rec = tb.Recorded(sim, xs, ys, tb.to_torch_images(px, torch.float64),
                      tb.to_torch_labels(py), w, 0.3)
    probe = {"x": jnp.asarray(px), "y": jnp.asarray(py)}
    cascade = dj.influence.e_cascade(loss_fn, traj, probe, step=1, hops=3)
    return cascade, rec


def _close(got, want):
    want = np.asarray(want)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_one_hop_dice_e_matches_dicejax(recorded):
    cascade, rec = recorded
    _close(tb.dice_e_one_hop(rec, 1), cascade.direct + cascade.per_hop[0])


def test_walk_enumeration_matches_dicejax(recorded):
    """Three hops: walks of length 1, 2 and 3 (chains of 0, 1 and 2 HVPs) all contribute."""
    cascade, rec = recorded
    rec.clear()
    got, count = tb.dice_e_walks(rec, 1, 3)
    _close(got, cascade.total)
    got2, _ = tb.dice_e_walks(rec, 1, 2)
    _close(got2, cascade.direct + cascade.per_hop[0] + cascade.per_hop[1])
    # the counts are those of explicit enumeration
    mats = rec.matrices[1:4]
    sh = tb.shells(mats)
    walks = hvps = 0
    for j in range(rec.n):
        for s in range(1, 4):
            for path in itertools.product(range(rec.n), repeat=s):
                full = (j, *path)
                if all(mats[m][full[m + 1], full[m]] > 0 for m in range(s)) \
                        and sh[s - 1][full[-1], j]:
                    walks += 1
                    hvps += s - 1
    assert count == {"walks": walks, "hvps": hvps}


@pytest.mark.parametrize("horizon", [1, 2])
def test_network_walks_match_dicejax(recorded, horizon):
    cascade, rec = recorded
    got, _ = tb.dice_e_walks(rec, 1, horizon, network=True)
    _close(got, cascade.network(hops=horizon))


def test_shells_match_dicejax(rng):
    mats = random_stochastic(6, rng, steps=3, density=0.3)
    np.testing.assert_array_equal(tb.shells(mats),
                                  np.asarray(dj.influence.shells(jnp.asarray(mats))))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_train_flops_count_every_product_once(name):
    model, params, *_ = _problem(name)
    fwd = dj.models.flops_per_example(model, SHAPE)
    first = 2 * 8 * 8 * 9 * 1 * 32 if name == "cnn" else 2 * 64 * 12  # first layer's fwd
    assert tb.train_flops_per_example(params, SHAPE) == 3 * fwd - first


def test_resnet18_twin_gives_the_same_logits_and_gradients():
    """The GroupNorm ResNet-18 and its torch twin are one function in float64.

    ``7×8`` images cover both of flax's ``'SAME'`` paddings of the stride-2 3x3 convs (odd
    heights ``7 → 4`` pad ``(1, 1)``; even widths ``8 → 4 → 2 → 1`` pad ``(0, 1)``, where
    torch's symmetric ``padding=1`` would differ), and a 1×1 map in the last stage. The
    GroupNorm scales and biases are moved off their ``1`` / ``0`` initialisation so that a
    swapped ``scale`` / ``bias`` would show.
    """
    shape = (7, 8, 3)
    model = dj.models.get_model("resnet18", CLASSES, width=8)
    params = dj.models.init_params(model, jax.random.PRNGKey(0), shape, dtype=jnp.float64)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape), params)
    x, y = rng.normal(size=(2, *shape)), np.array([3, 7])
    tm = tb.make_torch_model(params, shape).to(torch.float64)
    assert isinstance(tm, tb.TorchResNet18)
    tp = tb.to_torch_params(params, shape, tm, torch.float64)
    assert set(tp) == {name for name, _ in tm.named_parameters()}
    back = tb.to_flax_params(tp, params, shape, tm)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))

    logits = jax.jit(model.apply)({"params": params}, x)
    loss, grads = jax.jit(jax.value_and_grad(dj.models.make_loss_fn(model)))(
        params, {"x": x, "y": y})
    xs, ys = tb.to_torch_images(x, torch.float64), tb.to_torch_labels(y)
    leaves = {k: v.clone().requires_grad_(True) for k, v in tp.items()}
    out = torch.func.functional_call(tm, leaves, (xs,))
    theirs = torch.nn.functional.cross_entropy(out, ys)
    tgrads = dict(zip(leaves, torch.autograd.grad(theirs, list(leaves.values())), strict=True))
    np.testing.assert_allclose(out.detach().numpy(), np.asarray(logits), rtol=0,
                               atol=1e-10 * float(np.abs(logits).max()))
    np.testing.assert_allclose(float(theirs.detach()), float(loss), rtol=1e-10)
    assert tb.max_rel_diff(tb.to_flax_params(tgrads, params, shape, tm), grads) < 1e-10
    assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # stacked [n, ...] parameters (what the simulators take) map node by node
    stacked = jax.tree.map(lambda p: np.stack([p, 2 * p]), params)
    tstacked = tb.to_torch_params(stacked, shape, tm, torch.float64)
    for name, p in tb.node_params(tstacked, 1).items():
        torch.testing.assert_close(p, 2 * tp[name], rtol=0, atol=0)
    for a, b in zip(jax.tree.leaves(tb.to_flax_params(tstacked, stacked, shape, tm)),
                    jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(a, b)
