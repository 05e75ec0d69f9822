"""Tests for dicejax.apps.collaborators, dicejax.experiments.rewire and ``dicejax rewire``.

The selection rule and the accumulation are checked against explicit loops; a rewired run
is replayed with ``simulate`` on its recorded schedule (bit for bit) and its accumulated
influence recomputed step by step; a node with adversarial data must be dropped by every
honest node that can drop it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
from conftest import make_problem
from dicejax import cli
from dicejax import topology as tp
from dicejax.apps import collaborators as co
from dicejax.commands import rewire as rewire_cmd
from dicejax.experiments.common import RunConfig
from dicejax.experiments.rewire import attacker_weight, default_keep, rewiring
from dicejax.influence import proximal, proximal_steps
from dicejax.mixing import from_topology
from dicejax.simulate import simulate

# ---------------------------------------------------------------------------------------------
# Selection and accumulation


def brute_select(influence, candidates, keep):
    n = influence.shape[0]
    W = np.zeros((n, n))
    for k in range(n):
        cands = [j for j in range(n) if candidates[k, j] and j != k]
        cands.sort(key=lambda j: (influence[k, j], j))  # stable: lower index wins ties
        kept = [k, *cands[:keep]]
        W[k, kept] = 1.0 / len(kept)
    return W


@pytest.mark.parametrize("keep", [0, 1, 2, 3, 10])
def test_select_matches_explicit_loop(rng, keep):
    n = 9
    influence = rng.integers(-3, 3, size=(n, n)).astype(float)  # many ties
    candidates = rng.uniform(size=(n, n)) < 0.5
    W = np.asarray(co.select(influence, candidates, keep))
    np.testing.assert_allclose(W, brute_select(influence, candidates, keep), rtol=0, atol=0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=1e-15)
    assert (np.diag(W) > 0).all()
    off = W * (1 - np.eye(n)) > 0
    assert not (off & ~candidates).any()
    assert (off.sum(axis=1) == np.minimum(keep, (candidates & ~np.eye(n, dtype=bool)).sum(1))).all()


def test_update_accumulates_with_decay(rng):
    n, S = 6, 4
    W0 = tp.exponential(n).matrix
    state = co.init(W0)
    expect_cands = (W0 > 0) & ~np.eye(n, dtype=bool)
    np.testing.assert_array_equal(state.candidates, expect_cands)
    g1, g2 = rng.normal(size=(S, n, n)), rng.normal(size=(2, n, n))
    decay = 0.7
    s1 = co.update(state, g1, keep=1, decay=decay)
    s2 = co.update(s1, g2, keep=1, decay=decay)
    total = np.zeros((n, n))
    for g in (*g1, *g2):  # step by step: discount everything so far, add the new step
        total = decay * total + g
    total = np.where(expect_cands, total, 0)
    np.testing.assert_allclose(s2.influence, total, rtol=1e-12)
    np.testing.assert_allclose(s2.matrix, brute_select(total, expect_cands, 1), atol=0)
    assert int(s2.count) == 2


@pytest.mark.parametrize(("call", "name"), [
    (lambda: co.select(np.zeros((3, 3)), np.ones((3, 3), bool), -1), "keep"),
    (lambda: co.select(np.zeros((3, 3)), np.ones((3, 3), bool), 1.5), "keep"),
    (lambda: co.select(np.zeros((3, 3)), np.ones((3, 3)), 1), "candidates"),
    (lambda: co.select(np.zeros((3, 4)), np.ones((3, 4), bool), 1), "influence"),
    (lambda: co.select(np.full((3, 3), np.nan), np.ones((3, 3), bool), 1), "influence"),
    (lambda: co.init(tp.one_peer_exponential(4)), "topology"),
    (lambda: co.init(np.ones((3, 3))), "topology"),
    (lambda: co.init(tp.ring(4).matrix, np.ones((3, 3), bool)), "candidates"),
    (lambda: co.update(co.init(tp.ring(4).matrix), np.zeros((4, 4)), 1), "influence_steps"),
    (lambda: co.update(co.init(tp.ring(4).matrix), np.zeros((1, 4, 4)), 1, decay=0.0),
     "decay"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_unweighted_proximal_equals_explicit_formula():
    loss, params, batches, probe = make_problem(n=5, steps=4, model="tanh")
    traj = simulate(loss, params, batches, tp.exponential(5), optax.adam(0.05), record=True)
    q = np.linspace(0.5, 1.5, 5) / 5
    for t in (2,):
        got = proximal(loss, traj, probe, step=t, node_weights=q, weighted=False)
        np.testing.assert_allclose(got, ref.proximal_brute(loss, traj, probe, t, q, False),
                                   rtol=1e-10, atol=1e-15)
        weighted = proximal(loss, traj, probe, step=t, node_weights=q)
        np.testing.assert_allclose(weighted, np.asarray(traj.matrix_at(t)) * got, rtol=1e-12)
    window = proximal_steps(loss, traj, probe, node_weights=q, start=1, stop=4, weighted=False)
    np.testing.assert_allclose(window[1], proximal(loss, traj, probe, step=2, node_weights=q,
                                                   weighted=False), rtol=1e-12)
    strided = proximal_steps(loss, traj, probe, node_weights=q, start=0, stop=4, stride=3)
    assert strided.shape == (2, 5, 5)
    np.testing.assert_allclose(strided[1], proximal(loss, traj, probe, step=3, node_weights=q),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="stride"):
        proximal_steps(loss, traj, probe, stride=0)


# ---------------------------------------------------------------------------------------------
# Rewired runs


def test_rewire_replays_and_accumulates_exactly():
    n, T, period = 6, 10, 3
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    opt = optax.sgd(0.3)
    W0 = tp.exponential(n).matrix
    seen = []
    res = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=1,
                    period=period, callback=lambda t, s: seen.append((t, np.asarray(s.matrix))))
    assert [t for t, _ in seen] == [3, 6, 9] and int(res.rewire.count) == 3
    sched = np.asarray(res.schedule)
    assert sched.shape == (T, n, n) and res.loss.shape == (T, n)
    np.testing.assert_array_equal(sched[:3], np.broadcast_to(W0, (3, n, n)))
    for (_, W), lo in zip(seen, (3, 6, 9)):
        block = sched[lo:lo + period]
        np.testing.assert_array_equal(block, np.broadcast_to(W, block.shape))
    # replaying the schedule reproduces the run bit for bit
    replay = simulate(loss, params, batches, sched, opt, record=True, mixing="dense")
    for a, b in zip(jax.tree.leaves(replay.final_params), jax.tree.leaves(res.state.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(replay.metrics["loss"], res.loss)
    # the accumulated influence is the sum over every scored step (all but the last period)
    # (proximal(weighted=False) is checked against the explicit formula above)
    total = sum(np.asarray(proximal(loss, replay, probe, step=t, weighted=False))
                for t in range(9))
    cands = (W0 > 0) & ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(res.rewire.influence, np.where(cands, total, 0), rtol=1e-9,
                               atol=1e-14)
    np.testing.assert_allclose(res.rewire.matrix, brute_select(np.where(cands, total, 0),
                                                               cands, 1), atol=0)


def test_rewire_with_a_robust_rule_replays_and_scores_its_own_run():
    """Each period runs the rule over its chosen graph (a replay of the schedule with the
    rule is bit for bit the same run), and the scores are the per-unit-weight proximal
    influence of that run's updates, accumulated as without a rule."""
    n, T, period = 6, 8, 4
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    opt = optax.sgd(0.3)
    res = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=2,
                    period=period, aggregator="median")
    replay = simulate(loss, params, batches, res.schedule, opt, record=True, mixing="dense",
                      aggregator="median")
    for a, b in zip(jax.tree.leaves(replay.final_params), jax.tree.leaves(res.state.params)):
        np.testing.assert_array_equal(a, b)
    plain = simulate(loss, params, batches, res.schedule, opt, mixing="dense")
    assert not np.allclose(jax.tree.leaves(plain.final_params)[0],
                           jax.tree.leaves(replay.final_params)[0])
    scored = replay.replace(simulator=replay.simulator.replace(
        mixer=from_topology(res.schedule, "dense")))
    total = sum(np.asarray(proximal(loss, scored, probe, step=t, weighted=False))
                for t in range(period))
    cands = (tp.exponential(n).matrix > 0) & ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(res.rewire.influence, np.where(cands, total, 0), rtol=1e-9,
                               atol=1e-14)


def poisoned_problem(n, T, node, step):
    """A problem whose ``node`` gets a NaN gradient (and loss) from global ``step`` on: the
    batches carry a flag the loss reads."""
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    flag = np.zeros(batches["y"].shape)
    flag[step:, node] = 1.0
    batches = {**batches, "nan": jnp.asarray(flag)}

    def poisoned(p, b):
        bad = jnp.any(b["nan"] > 0) if "nan" in b else False
        return loss(p, b) + jnp.where(bad, jnp.nan, 0.0) * jnp.sum(p["w1"])

    return poisoned, params, batches, probe


def test_rewire_isolates_a_diverged_node_and_drops_it():
    n, T, period = 6, 9, 3
    loss, params, batches, probe = poisoned_problem(n, T, node=2, step=4)
    opt = optax.sgd(0.3)
    with pytest.raises(FloatingPointError, match="node 2"):
        co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=2, period=period)
    res = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=2,
                    period=period, on_divergence="isolate")
    sched = np.asarray(res.schedule)
    listeners = [k for k in range(n) if k != 2 and sched[4, k, 2] > 0]
    expect = np.full(n, -1)
    expect[2] = 4
    expect[listeners] = 5  # they receive node 2's NaN at step 4 and diverge with it
    np.testing.assert_array_equal(res.diverged, expect)
    gone = set(listeners) | {2}
    after = sched[6:]  # after the next rewiring nobody keeps a diverged node
    for k in range(n):
        for j in gone - {k}:
            assert np.all(after[:, k, j] == 0), (k, j)
    alive = [k for k in range(n) if k not in gone]
    assert alive
    for leaf in jax.tree.leaves(res.state.params):
        assert np.all(np.isfinite(np.asarray(leaf)[alive]))
    # with the median, a diverged node is not heard: its listeners stay finite
    med = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=2,
                    period=period, on_divergence="isolate", aggregator="median")
    assert np.asarray(med.diverged).tolist() == [-1, -1, 4, -1, -1, -1]


def test_update_never_keeps_a_non_finite_candidate():
    n = 4
    state = co.init(jnp.full((n, n), 1 / n))
    g = jnp.zeros((1, n, n)).at[0, :, 1].set(jnp.nan).at[0, :, 2].set(-1.0)
    new = co.update(state, g, keep=2)
    assert bool(jnp.all(jnp.isinf(new.influence[jnp.arange(n) != 1, 1])))
    W = np.asarray(new.matrix)
    assert np.all(W[[0, 2, 3], 1] == 0)  # infinitely harmful: dropped although keep=2
    np.testing.assert_allclose(W[0], [1 / 3, 0, 1 / 3, 1 / 3])
    with pytest.raises(ValueError, match="influence: NaN"):
        co.select(jnp.full((n, n), jnp.nan), jnp.ones((n, n), bool), 1)


def test_rewire_stride_and_controls():
    n, T, period = 6, 8, 4
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh")
    opt = optax.sgd(0.3)
    res = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=2,
                    period=period, stride=3)
    replay = simulate(loss, params, batches, res.schedule, opt, record=True, mixing="dense")
    total = sum(np.asarray(proximal(loss, replay, probe, step=t, weighted=False))
                for t in (0, 3))
    cands = np.asarray(res.rewire.candidates)
    np.testing.assert_allclose(res.rewire.influence, np.where(cands, total, 0), rtol=1e-9,
                               atol=1e-14)
    # a control that ignores influence: nothing is recorded or scored
    seen = []

    def reverse(state, influence_steps, keep):
        seen.append(influence_steps)
        return state._replace(matrix=co.select(-jnp.arange(n) * 1.0 + 0 * state.influence,
                                               state.candidates, keep))

    ctl = co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=1,
                    period=period, chooser=reverse, score=False)
    assert seen == [None]
    np.testing.assert_allclose(ctl.schedule[-1], brute_select(
        np.broadcast_to(-np.arange(n) * 1.0, (n, n)), cands, 1), atol=0)
    with pytest.raises(ValueError, match="score"):
        co.rewire(loss, params, batches, tp.exponential(n), opt, probe, keep=1, score=False)


def adversarial_problem(n, steps, attacker, seed=0):
    """Linear regression ``y = x·w*``; the attacker's targets are ``−5 x·w*``."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=3)
    x = rng.normal(size=(steps, n, 8, 3))
    y = x @ w_star
    y[:, attacker] *= -5.0
    probe_x = rng.normal(size=(32, 3))

    def loss(p, b):
        return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)

    params = {"w": jnp.zeros((n, 3))}
    batches = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    probe = {"x": jnp.asarray(probe_x), "y": jnp.asarray(probe_x @ w_star)}
    return loss, params, batches, probe, w_star


def test_adversarial_neighbour_is_dropped_and_honest_nodes_gain():
    n, T, attacker = 8, 40, 0
    loss, params, batches, probe, w_star = adversarial_problem(n, T, attacker)
    topo = tp.exponential(n)  # in-neighbours k-1, k-2, k-4
    opt = optax.sgd(0.05)
    res = co.rewire(loss, params, batches, topo, opt, probe, keep=2, period=10)
    W = np.asarray(res.rewire.matrix)
    honest = [k for k in range(n) if k != attacker]
    for k in honest:
        assert W[k, attacker] == 0, (k, W[k])
        if topo.matrix[k, attacker] > 0:  # it was an in-neighbour: the most harmful one
            row = np.where(np.asarray(res.rewire.candidates)[k], res.rewire.influence[k], -np.inf)
            assert row.argmax() == attacker
    fixed = simulate(loss, params, batches, topo, opt, record=False)

    def err(p):
        return np.linalg.norm(np.asarray(p["w"])[honest] - w_star, axis=1).mean()

    assert err(res.state.params) < 0.5 * err(fixed.final_params)
    share = attacker_weight(res.schedule, [attacker])
    assert share[0] > 0 and share[-1] == 0
    np.testing.assert_allclose(share[0], np.mean([topo.matrix[k, attacker] for k in honest]))


def test_rewire_validation():
    loss, params, batches, probe = make_problem(n=4, steps=4)
    with pytest.raises(ValueError, match="period"):
        co.rewire(loss, params, batches, tp.ring(4), optax.sgd(0.1), probe, keep=1, period=0)
    with pytest.raises(ValueError, match="keep"):
        co.rewire(loss, params, batches, tp.ring(4), optax.sgd(0.1), probe, keep=-2)


# ---------------------------------------------------------------------------------------------
# The experiment and the CLI


def run_rewire(argv):
    parser = argparse.ArgumentParser(prog="dicejax")
    sub = parser.add_subparsers(dest="command", required=True)
    rewire_cmd.register(sub, cli._run_args, cli._config)
    args = parser.parse_args(argv)
    return args.fn(args)


@pytest.mark.slow
def test_rewire_cli_on_digits(tmp_path):
    out = tmp_path / "rw"
    argv = ["rewire", "--dataset", "digits", "--nodes", "16", "--topology", "exponential",
            "--steps", "60", "--period", "20", "--keep", "2", "--candidates", "graph",
            "--seeds", "2",
            "--attackers", "random:4", "--out", str(out)]
    assert run_rewire(argv) == 0
    result = json.loads((out / "rewire.json").read_text())
    assert (out / "rewire.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert result["arms"] == ["clean", "fixed", "influence", "random", "oracle"]
    W0 = tp.exponential(16).matrix
    for r in result["per_seed"]:
        bad = r["attackers"]
        assert len(bad) == 4
        arms = r["arms"]
        honest = [k for k in range(16) if k not in bad]
        # the fixed graph never changes: the attackers' share is their weight in W0
        expect = np.mean([W0[k, bad].sum() for k in honest])
        np.testing.assert_allclose(arms["fixed"]["attacker_weight_per_period"], expect)
        # after the first period the oracle keeps an attacker only where it must
        forced = []
        for k in honest:
            cands = [j for j in range(16) if j != k and W0[k, j] > 0]
            kept = min(2, len(cands))
            forced.append(max(0, kept - sum(j not in bad for j in cands)) / (kept + 1))
        np.testing.assert_allclose(arms["oracle"]["attacker_weight_per_period"][1:],
                                   np.mean(forced), atol=1e-6)
        # influence-guided selection gives attackers less weight than random selection
        assert arms["influence"]["attacker_weight"] < arms["random"]["attacker_weight"]
        W = np.asarray(arms["influence"]["final_matrix"])
        np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=1e-6)
        assert ((W > 0).sum(axis=1) <= 3).all()
        assert not ((W > 0) & (W0 == 0)).any()
    assert set(result["gain"]) == {"clean", "influence", "random", "oracle"}


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(attack="backdoor"), "attack"),
    (dict(arms=["fixed", "magic"]), "arms"),
    (dict(arms=["oracle+median"]), "arms"),
    (dict(arms=[]), "arms"),
    (dict(keep=0), "keep"),
    (dict(period=10), "period"),
    (dict(seeds=[]), "seeds"),
    (dict(attackers=16), "attackers"),
    (dict(candidates="friends"), "candidates"),
])
def test_rewiring_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rewiring(RunConfig(nodes=16, steps=10), **{"period": 5, **kwargs})


@pytest.mark.slow
def test_rewiring_rule_arms_run_the_rule():
    """``fixed+median`` is the attacked fixed graph gossiped by the median: its accuracy is
    that of a direct ``simulate(..., aggregator="median")`` run of the same seed."""
    from dicejax.experiments.anomaly import apply_attack, corruption_for
    from dicejax.experiments.common import build, evaluate_params, pick_attackers
    config = RunConfig(nodes=8, steps=12, topology="exponential", samples_per_node=64)
    out = rewiring(config, "label_permutation", attackers=2, period=6, seeds=[0],
                   arms=["fixed", "fixed+median", "influence+trimmed_mean"])
    arms = out["per_seed"][0]["arms"]
    assert list(arms) == ["fixed", "fixed+median", "influence+trimmed_mean"]
    cfg = dataclasses.replace(config, seed=0)
    setup = build(cfg)
    chosen = pick_attackers(2, 8, 0)
    batches, scale = apply_attack(setup, "label_permutation",
                                  corruption_for("label_permutation", 10.0, 0), chosen, 0)
    traj = simulate(setup.loss_fn, setup.params, batches, setup.topology, setup.optimizer,
                    record=False, update_scale=scale, aggregator="median")
    acc = np.asarray(evaluate_params(setup.eval_fn, traj.final_params, setup.test)["accuracy"])
    honest = np.setdiff1d(np.arange(8), chosen)
    np.testing.assert_allclose(arms["fixed+median"]["accuracy"], acc[honest].mean(),
                               rtol=1e-6)


def test_default_keep_is_the_in_degree():
    assert default_keep(RunConfig(nodes=32, topology="exponential")) == 5
    assert default_keep(RunConfig(nodes=16, topology="ring")) == 2


def test_update_t_statistic_ranks_consistent_help_above_noisy_help():
    """Candidate 1 helps by -1 at every step; candidate 2 by -10, +8, -10, +7 (a larger sum,
    a large spread). The sum keeps 2, the t statistic keeps 1; both against numpy."""
    n = 3
    state = co.init(jnp.full((n, n), 1 / n))
    g = np.zeros((4, n, n))
    g[:, 0, 1] = -1.0
    g[:, 0, 2] = [-10.0, 8.0, -10.0, 7.0]
    g[:, 1, 0] = [0.5, -0.5, 1.0, -1.0]
    g[:, 1, 2] = [-0.5, -0.6, -0.4, -0.5]
    by_sum = co.update(state, jnp.asarray(g), keep=1)
    by_t = co.update(state, jnp.asarray(g), keep=1, statistic="t")
    np.testing.assert_allclose(by_t.influence, by_sum.influence)
    assert np.asarray(by_sum.matrix)[0, 2] > 0 and np.asarray(by_sum.matrix)[0, 1] == 0
    assert np.asarray(by_t.matrix)[0, 1] > 0 and np.asarray(by_t.matrix)[0, 2] == 0
    m, sd = g.mean(0), g.std(0)  # population spread, as the running moments give
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, m / (sd / 2.0), np.where(m != 0, np.sign(m) * np.inf, 0))
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(np.asarray(by_t.t_statistic())[off], t[off], rtol=1e-10)
    # a second period continues the same moments
    two = co.update(by_t, jnp.asarray(g), keep=1, statistic="t")
    gg = np.concatenate([g, g])[:, 1, [0, 2]]  # node 1's two candidates: a spread each
    t2 = gg.mean(0) / (gg.std(0) / np.sqrt(8))
    np.testing.assert_allclose(np.asarray(two.t_statistic())[1, [0, 2]], t2, rtol=1e-10)
    with pytest.raises(ValueError, match="statistic"):
        co.update(state, jnp.asarray(g), keep=1, statistic="median")


@pytest.mark.slow
def test_rewire_cli_with_an_intermittent_label_noise_attacker(tmp_path):
    """--attack label_noise --fraction F --on K --off K reach the run: the clean arm equals
    the fixed arm when the attack corrupts no step's labels, and the result records them."""
    common = ["rewire", "--dataset", "digits", "--nodes", "6", "--topology", "ring",
              "--steps", "8", "--period", "4", "--keep", "2", "--batch", "8", "--seeds", "1",
              "--eval-every", "0", "--probe-size", "16", "--test-size", "48",
              "--attackers", "2", "--arms", "clean,fixed"]
    out = tmp_path / "noise"
    assert run_rewire([*common, "--attack", "label_noise", "--fraction", "0.5", "--on", "1",
                       "--off", "1", "--out", str(out)]) == 0
    result = json.loads((out / "rewire.json").read_text())
    assert (result["attack"], result["fraction"], result["on"], result["off"]) == \
        ("label_noise", 0.5, 1, 1)
    arms = result["per_seed"][0]["arms"]
    assert arms["fixed"]["accuracy"] != arms["clean"]["accuracy"]  # the labels did change
    # the every-step attacker's fixed run differs from the intermittent one's; the clean
    # arm (no attack) is the same run
    every = tmp_path / "every"
    assert run_rewire([*common, "--attack", "label_noise", "--fraction", "0.5",
                       "--out", str(every)]) == 0
    full = json.loads((every / "rewire.json").read_text())["per_seed"][0]["arms"]
    assert full["fixed"]["accuracy"] != arms["fixed"]["accuracy"]
    assert full["clean"]["accuracy"] == arms["clean"]["accuracy"]
