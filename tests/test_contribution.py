"""Contribution ledger, the Figure-1 cascade experiment and their commands."""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import dicejax as dj
from conftest import make_problem, random_stochastic
from dicejax import influence as di
from dicejax.apps import contribution as ct
from dicejax.cli import _config, _run_args
from dicejax.experiments.cascade import ranks, same_batch_at, spearman
from dicejax.experiments.common import RunConfig

# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_shares_signed_and_clipped():
    c = np.array([3.0, -1.0, 0.0, 1.0])
    s = np.asarray(ct.shares(c))
    np.testing.assert_allclose(s, c / 5.0)
    assert np.isclose(np.abs(s).sum(), 1.0)
    k = np.asarray(ct.shares(c, "clipped"))
    np.testing.assert_allclose(k, [0.75, 0.0, 0.0, 0.25])
    assert np.isclose(k.sum(), 1.0) and (k >= 0).all()
    np.testing.assert_array_equal(ct.shares(np.zeros(3)), np.zeros(3))
    np.testing.assert_array_equal(ct.shares(-np.ones(3), "clipped"), np.zeros(3))
    with pytest.raises(ValueError, match="mode"):
        ct.shares(c, "other")
    with pytest.raises(ValueError, match="contribution"):
        ct.shares(np.ones((2, 2)))


def test_from_attribution_and_reciprocity():
    a = np.array([[-1.0, 2.0, 0.0], [-3.0, 1.0, 0.0]])
    prox = np.array([[9.0, -1.0, -2.0], [-4.0, 9.0, 0.0], [0.0, -1.0, 9.0]])
    led = ct.from_attribution(a, prox)
    np.testing.assert_allclose(led.influence, [-4.0, 3.0, 0.0])
    np.testing.assert_allclose(led.contribution, [4.0, -3.0, 0.0])
    np.testing.assert_allclose(led.shares, [4 / 7, -3 / 7, 0.0])
    np.testing.assert_allclose(led.clipped_shares, [1.0, 0.0, 0.0])
    rec = led.reciprocity
    np.testing.assert_allclose(rec.given, [4.0, 2.0, 2.0])  # −column sums off the diagonal
    np.testing.assert_allclose(rec.received, [3.0, 4.0, 1.0])  # −row sums off the diagonal
    np.testing.assert_allclose(rec.factor, np.asarray(di.neighbourhood_factor(prox)))
    assert ct.from_attribution(a).reciprocity is None


@pytest.mark.slow
def test_ledger_consistency_with_trajectory_attribution(rng):
    n, T = 4, 5
    loss, params, batches, probe = make_problem(n=n, steps=T, model="tanh", seed=3)
    W = random_stochastic(n, rng)
    scale = np.ones((T, n))
    scale[:, 2] = 0.0  # a free-rider
    traj = dj.simulate(loss, params, batches, W, optimizer=optax.sgd(0.2), update_scale=scale)
    led = ct.contributions(loss, traj, probe, proximal=True)
    attribution = np.asarray(di.trajectory_attribution(loss, traj, probe))
    np.testing.assert_allclose(led.per_step, attribution)
    np.testing.assert_allclose(led.contribution, -attribution.sum(axis=0))
    # the last step's attribution is the one-hop network-level ledger entry, the first's the
    # network-level estimate at the whole-run horizon
    lg = di.ledger(loss, traj, probe, hops=1)
    np.testing.assert_allclose(attribution[T - 1], lg.network[T - 1], rtol=1e-8, atol=1e-12)
    first = di.dice_e_network(loss, traj, probe, 0, hops=T)
    np.testing.assert_allclose(attribution[0], first, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(led.reciprocity.proximal, lg.proximal)
    assert led.contribution[2] == 0.0 and led.shares[2] == 0.0


def test_spearman_matches_scipy():
    r = np.random.default_rng(0)
    x, y = r.normal(size=20), r.normal(size=20)
    y[3] = y[5]  # a tie
    x[1] = x[2] = x[7]
    assert np.isclose(spearman(x, y), stats.spearmanr(x, y).statistic)
    np.testing.assert_allclose(ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_same_batch_at():
    b = {"x": np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2), "y": np.arange(6).reshape(2, 3)}
    b = {k: jnp.asarray(v) for k, v in b.items()}
    s = same_batch_at(b, 1)
    np.testing.assert_array_equal(s["y"][1], [3, 3, 3])
    np.testing.assert_array_equal(s["x"][0], b["x"][0])
    np.testing.assert_array_equal(s["x"][1], np.broadcast_to(b["x"][1, 0], (3, 2)))


# ---------------------------------------------------------------------------------------------
# Commands (they run the experiments at tiny settings)


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    module.register(sub, _run_args, _config)
    return parser.parse_args(argv)


TINY = ["--nodes", "8", "--steps", "30", "--eval-every", "0", "--probe-size", "64",
        "--test-size", "200"]


@pytest.mark.slow
def test_contribute_command_corrupted_nodes_get_lower_shares(tmp_path):
    from dicejax.commands import contribute

    out = tmp_path / "contrib"
    a = _parse(contribute, ["contribute", *TINY, "--permuted", "3", "--free-riders", "5",
                            "--no-proximal", "--out", str(out)])
    assert a.fn(a) == 0
    r = json.loads((out / "contribute.json").read_text())
    assert (out / "contribute.png").stat().st_size > 0
    s = np.asarray(r["shares"])
    assert np.isclose(np.abs(s).sum(), 1.0)
    assert np.isclose(np.sum(r["clipped_shares"]), 1.0)
    honest = [j for j, role in enumerate(r["roles"]) if role == "honest"]
    assert r["roles"][3] == "permuted" and r["roles"][5] == "free_rider"
    assert s[5] == 0.0  # a free-rider's gate has no effect
    assert s[3] < s[honest].min()
    assert s[5] < s[honest].min()
    assert "neighbourhood_factor" not in r  # --no-proximal (reciprocity is tested above)


def test_contribution_run_rejects_overlap():
    from dicejax.commands.contribute import contribution_run

    with pytest.raises(ValueError, match="cannot be both"):
        contribution_run(RunConfig(nodes=4, steps=2), [1], [1])


@pytest.mark.slow
def test_cascade_command_shapes_and_spearman(tmp_path):
    from dicejax.commands import cascade

    out = tmp_path / "cascade"
    a = _parse(cascade, ["cascade", "--steps", "6", "--eval-every", "0", "--probe-size", "32",
                         "--test-size", "100", "--hops", "1", "--placements", "2",
                         "--out", str(out)])
    assert a.fn(a) == 0
    r = json.loads((out / "cascade.json").read_text())
    assert (out / "cascade.png").stat().st_size > 0
    n, h, m = 16, 1, 2
    assert r["placement_steps"] == [4, 5]
    assert np.asarray(r["gt"]["per_hop"]).shape == (m, h, n)
    assert np.asarray(r["gt"]["network"]).shape == (m, h, n)
    assert np.asarray(r["e"]["matrix"]).shape == (m, h, n, n)
    assert np.asarray(r["magnitude_per_hop"]).shape == (h, n)
    w = np.asarray(r["out_weight"])
    np.testing.assert_allclose(w, dj.topology.designed16().out_weight)
    mag = np.abs(np.asarray(r["gt"]["network"])[:, -1]).mean(axis=0)
    np.testing.assert_allclose(r["magnitude"], mag, rtol=1e-6)
    assert np.isclose(r["spearman"], stats.spearmanr(w, mag).statistic)
    assert len(r["spearman_per_hop"]) == h
    direct = np.abs(np.asarray(r["gt"]["direct"]))
    amp = np.median(np.abs(np.asarray(r["gt"]["network"])) / direct[:, None, :], axis=0)
    np.testing.assert_allclose(r["amplification"], amp, rtol=1e-6)
    assert np.isclose(r["spearman_amplification"][0], stats.spearmanr(w, amp[0]).statistic)


def test_cascade_rejects_bad_placements():
    from dicejax.experiments.cascade import cascade_experiment

    with pytest.raises(ValueError, match="placements"):
        cascade_experiment(RunConfig(steps=4), hops=3, placements=2)
