"""Tests for dicejax.apps.anomaly, dicejax.experiments.anomaly and ``dicejax detect``.

The rule and the metrics are checked on constructed numbers against brute-force twins; the
end-to-end test trains 16 nodes on the bundled digits with one label-permuting attacker that
must be caught. The expensive run is a module-scoped fixture (the CLI, two seeds).
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_problem
from dicejax import cli
from dicejax import topology as tp
from dicejax.apps import anomaly
from dicejax.commands import detect as detect_cmd
from dicejax.experiments.anomaly import detection, strength_curve
from dicejax.experiments.common import RunConfig
from dicejax.influence import proximal
from dicejax.simulate import simulate

# ---------------------------------------------------------------------------------------------
# The robust z-score rule


def brute_z(values, edges, min_scale):
    n = values.shape[0]
    z = np.full((n, n), np.nan)
    for k in range(n):
        js = np.flatnonzero(edges[k])
        if js.size == 0:
            continue
        x = values[k, js]
        med = np.median(x)
        scale = max(1.4826 * np.median(np.abs(x - med)), min_scale * abs(med))
        with np.errstate(divide="ignore", invalid="ignore"):
            z[k, js] = np.where(x == med, 0.0, (x - med) / scale)
    return z


def constructed():
    """Rows with 5 in-neighbours each (the diagonal is never an edge)."""
    n = 6
    edges = ~np.eye(n, dtype=bool)
    rows = {0: [1, 2, 3, 4, 100], 1: [10, 10, 10, 10, 11], 2: [-10, -12, -8, -11, 20],
            3: [5, 5, 5, 5, 5], 4: [0, 0, 0, 0, 1], 5: [3, 1, 2, 5, 4]}
    values = np.zeros((n, n))
    for k, r in rows.items():
        values[k, edges[k]] = r
    values[np.arange(n), np.arange(n)] = 1e6  # self-influence must be ignored
    return values, edges


def test_robust_z_on_constructed_numbers():
    values, edges = constructed()
    z = np.asarray(anomaly.robust_zscores(values, edges, min_scale=0.0))
    # row 0: median 3, MAD 1 -> the outlier 100 scores 97 / 1.4826
    np.testing.assert_allclose(z[0, 1:], np.array([-2, -1, 0, 1, 97]) / 1.4826)
    # row 1: MAD 0 -> the one deviating value is infinitely far, the others 0
    np.testing.assert_array_equal(z[1, [0, 2, 3, 4, 5]], [0, 0, 0, 0, np.inf])
    # row 2: median -10, MAD 2
    np.testing.assert_allclose(z[2, [0, 1, 3, 4, 5]], np.array([0, -2, 2, -1, 30]) / 2.9652)
    np.testing.assert_array_equal(z[3, [0, 1, 2, 4, 5]], 0)
    assert np.isnan(np.diag(z)).all()
    np.testing.assert_allclose(z, brute_z(values, edges, 0.0), equal_nan=True)


def test_robust_z_scale_floor():
    values, edges = constructed()
    z = np.asarray(anomaly.robust_zscores(values, edges, min_scale=0.25))
    assert z[1, 5] == pytest.approx(1 / 2.5)  # floor 0.25 * |10| replaces MAD = 0
    np.testing.assert_allclose(z[2, 5], 30 / 2.9652)  # MAD scale (2.97) > floor (2.5)
    assert z[4, 5] == np.inf  # median 0: no floor
    np.testing.assert_allclose(z, brute_z(values, edges, 0.25), equal_nan=True)


def test_robust_z_random_against_brute_force(rng):
    W = tp.erdos_renyi(12, 0.4, seed=3).matrix
    edges = np.asarray(anomaly.in_edges(W))
    values = rng.normal(size=(12, 12))
    for c in (0.0, 0.25, 1.0):
        np.testing.assert_allclose(anomaly.robust_zscores(values, edges, c),
                                   brute_z(values, edges, c), equal_nan=True, rtol=1e-12)


def test_robust_z_rows_without_edges_and_validation():
    edges = np.zeros((3, 3), bool)
    edges[0, 1] = edges[0, 2] = True
    z = np.asarray(anomaly.robust_zscores(np.ones((3, 3)), edges))
    assert np.isnan(z[1:]).all() and (z[0, 1:] == 0).all()
    with pytest.raises(ValueError, match="values"):
        anomaly.robust_zscores(np.ones((3, 2)), edges)
    with pytest.raises(ValueError, match="edges"):
        anomaly.robust_zscores(np.ones((3, 3)), edges.astype(int))
    with pytest.raises(ValueError, match="min_scale"):
        anomaly.robust_zscores(np.ones((3, 3)), edges, -1.0)


def test_detect_flags_one_sided():
    values, edges = constructed()
    det = anomaly.detect(-values, edges, threshold=3.5)  # outliers are now helpful, not harm
    assert not np.asarray(det.flagged).any()
    det = anomaly.detect(values, edges, threshold=3.5)
    assert det.flagged_neighbours() == [[5], [], [5], [], [5], []]
    assert np.isnan(np.asarray(det.influence)[~edges]).all()
    with pytest.raises(ValueError, match="threshold"):
        anomaly.detect(values, edges, threshold=float("nan"))


# ---------------------------------------------------------------------------------------------
# Accumulation and edges


def test_accumulate_normalises_by_weights(rng):
    S, n = 4, 5
    W = rng.uniform(size=(S, n, n)) * (rng.uniform(size=(S, n, n)) < 0.6)
    P = rng.normal(size=(S, n, n)) * (W > 0)
    expected = np.zeros((n, n))
    for t, k, j in itertools.product(range(S), range(n), range(n)):
        if W[t, k, j] > 0:
            expected[k, j] += P[t, k, j] / W[t, k, j]
    np.testing.assert_allclose(anomaly.accumulate(P, W), expected, rtol=1e-12)
    np.testing.assert_allclose(anomaly.accumulate(P, W, normalize=False), P.sum(0))
    np.testing.assert_allclose(anomaly.accumulate(P, W[0]),
                               np.where(W[0] > 0, P / np.where(W[0] > 0, W[0], 1), 0).sum(0))
    with pytest.raises(ValueError, match="matrices"):
        anomaly.accumulate(P, W[:2])
    with pytest.raises(ValueError, match="prox"):
        anomaly.accumulate(P[..., :3], W)


def test_in_edges_union_without_self():
    a, b = np.eye(3) * 0.5, np.eye(3) * 0.5
    a[0, 1] = a[0, 0] = 0.5
    b[2, 0] = 0.5
    e = np.asarray(anomaly.in_edges(np.stack([a, b])))
    expected = np.zeros((3, 3), bool)
    expected[0, 1] = expected[2, 0] = True
    np.testing.assert_array_equal(e, expected)
    assert int(anomaly.in_edges(tp.exponential(32).matrix).sum(axis=1).min()) == 5


def test_proximal_steps_matches_proximal():
    loss, params, batches, probe = make_problem(n=5, steps=6)
    traj = simulate(loss, params, batches, tp.exponential(5), optax.sgd(0.1), record=True)
    P = anomaly.proximal_steps(loss, traj, probe, start=1, stop=5)
    assert P.shape == (4, 5, 5)
    for s in range(4):
        np.testing.assert_allclose(P[s], proximal(loss, traj, probe, step=1 + s), rtol=1e-12)
    with pytest.raises(ValueError, match="stop"):
        anomaly.proximal_steps(loss, traj, probe, start=3, stop=3)
    with pytest.raises(ValueError, match=r"hops|step"):
        anomaly.proximal_steps(loss, traj, probe, start=2, stop=7)


# ---------------------------------------------------------------------------------------------
# Metrics


def brute_auc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    return float(np.mean(wins))


def test_roc_auc_constructed():
    assert anomaly.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert anomaly.roc_auc([1, 2, 3], [0, 1, 1]) == 1.0
    assert anomaly.roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert anomaly.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert anomaly.roc_auc([np.inf, 5.0, -np.inf], [1, 0, 0]) == 1.0


def test_roc_auc_against_pairs(rng):
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.uniform(size=40) < 0.3
    assert anomaly.roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels))
    with pytest.raises(ValueError, match="labels"):
        anomaly.roc_auc(scores, np.zeros(40, bool))
    with pytest.raises(ValueError, match="scores"):
        anomaly.roc_auc([np.nan, 1.0], [0, 1])


def test_evaluate_counts():
    W = tp.exponential(8).matrix  # in-neighbours k-1, k-2, k-4
    edges = np.asarray(anomaly.in_edges(W))
    scores = np.where(edges, 0.0, np.nan)
    scores[:, 0] = np.where(edges[:, 0], 10.0, np.nan)  # attacker 0 scores high everywhere
    scores[1, 0] = 1.0  # ... except at node 1, where node 7 scores higher
    scores[1, 7] = 5.0
    det = anomaly.detect(np.zeros((8, 8)), edges)._replace(
        scores=scores, flagged=np.nan_to_num(scores) > 3.5)
    m = anomaly.evaluate(det, [0])
    assert (m.true_positives, m.false_positives, m.false_negatives) == (2, 1, 1)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    assert m.top1 == pytest.approx(2 / 3)  # attacked: nodes 1, 2, 4; node 1 ranks 7 first
    labels = anomaly.edge_labels(edges, [0])[edges]
    assert m.roc_auc == pytest.approx(brute_auc(scores[edges], labels))
    with pytest.raises(ValueError, match="attackers"):
        anomaly.edge_labels(edges, [8])


# ---------------------------------------------------------------------------------------------
# End to end: the attacker must be caught


SETTING = ["--dataset", "digits", "--nodes", "16", "--topology", "exponential", "--model",
           "mlp", "--lr", "0.1", "--batch", "16", "--steps", "100", "--probe-size", "128"]


def run_detect(argv):
    parser = argparse.ArgumentParser(prog="dicejax")
    sub = parser.add_subparsers(dest="command", required=True)
    detect_cmd.register(sub, cli._run_args, cli._config)
    args = parser.parse_args(argv)
    return args.fn(args)


def strict_load(path):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    argv = ["detect", *SETTING, "--attack", "label_permutation", "--window", "50",
            "--seeds", "2", "--out", str(out)]
    assert run_detect(argv) == 0
    return out, strict_load(out / "detect.json")


@pytest.mark.slow
def test_label_permuting_attacker_is_caught(cli_run):
    _, result = cli_run
    assert result["seeds"] == [0, 1]
    W = tp.exponential(16).matrix
    for r in result["per_seed"]:
        (a,) = r["attackers"]
        out_neighbours = [k for k in range(16) if k != a and W[k, a] > 0]
        assert r["roc_auc"] >= 0.95, r
        assert r["top1"] == 1.0  # every attacked node ranks the attacker first
        scores = np.asarray(r["scores"], dtype=float)
        for k in out_neighbours:
            row = np.where(np.isnan(scores[k]), -np.inf, scores[k])
            assert row.argmax() == a
        caught = sum(a in r["flagged"][k] for k in out_neighbours)
        assert caught >= 3, (caught, r["flagged"])
        assert r["recall"] >= 0.75 and r["precision"] >= 0.5
    assert result["roc_auc"]["mean"] >= 0.97


@pytest.mark.slow
def test_detect_writes_json_and_figure(cli_run, capsys):
    out, result = cli_run
    assert (out / "detect_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert result["attack"] == "label_permutation" and result["window"] == 50
    assert result["config"]["nodes"] == 16 and result["threshold"] == 3.5
    r = result["per_seed"][0]
    assert len(r["flagged"]) == 16 and len(r["scores"]) == 16
    assert set(r["roc"]) == {"fpr", "tpr"} and r["roc"]["tpr"][-1] == 1.0
    for key in ("roc_auc", "precision", "recall", "top1", "honest_accuracy",
                "combined_precision", "combined_recall"):
        assert set(result[key]) == {"mean", "std", "min", "max"}
    assert np.asarray(r["relative_norm"], dtype=float).shape == (16, 16)


@pytest.mark.slow
def test_gaussian_noise_attacker_is_caught():
    config = RunConfig(nodes=16, steps=100, probe_size=128)
    result = detection(config, "gaussian_noise", attackers=[5], window=50, seeds=[3])
    (r,) = result["per_seed"]
    assert r["attackers"] == [5] and r["roc_auc"] >= 0.95 and r["top1"] == 1.0
    assert r["recall"] >= 0.75


@pytest.mark.slow
def test_strength_curve_equals_one_detection_per_std_and_the_cli_writes_it(tmp_path):
    config = RunConfig(nodes=8, steps=12, batch=8, probe_size=32, test_size=64, eval_every=0)
    curve = strength_curve(config, [0.5, 8.0], attackers=[3], window=6, seeds=[1])
    assert curve["stds"] == [0.5, 8.0] and len(curve["points"]) == 2
    for std, point in zip(curve["stds"], curve["points"], strict=True):
        alone = detection(config, "gaussian_noise", attackers=[3], window=6, seeds=[1],
                          std=std)
        assert point["std"] == std
        for key in ("roc_auc", "precision", "recall", "combined_recall", "honest_accuracy"):
            assert point[key] == alone[key], key
        np.testing.assert_array_equal(np.asarray(point["per_seed"][0]["scores"], float),
                                      np.asarray(alone["per_seed"][0]["scores"], float))
    argv = ["detect", "--dataset", "digits", "--nodes", "8", "--batch", "8", "--steps", "12",
            "--probe-size", "32", "--test-size", "64", "--eval-every", "0", "--window", "6",
            "--seeds", "1", "--seed", "1", "--attackers", "3", "--attack", "gaussian_noise",
            "--strengths", "0.5,8", "--out", str(tmp_path)]
    assert run_detect(argv) == 0
    saved = strict_load(tmp_path / "detect_strength.json")
    assert saved["stds"] == [0.5, 8.0]
    assert [p["roc_auc"] for p in saved["points"]] == [p["roc_auc"] for p in curve["points"]]
    assert (tmp_path / "detect_strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="stds"):
        strength_curve(config, [], window=6)
    with pytest.raises(ValueError, match="stds"):
        strength_curve(config, [1.0, -2.0], window=6)


def test_detect_argument_parsing():
    assert detect_cmd._attackers("3,17") == [3, 17]
    assert detect_cmd._attackers("random:2") == 2
    with pytest.raises(SystemExit):
        run_detect(["detect", "--attackers", "three"])
    with pytest.raises(SystemExit):
        run_detect(["detect", "--attack", "backdoor"])


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(attack="backdoor"), "attack"),
    (dict(window=0), "window"),
    (dict(window=11), "window"),
    (dict(seeds=[]), "seeds"),
    (dict(attackers=[16]), "attackers"),
    (dict(attackers=16), "attackers"),
    (dict(threshold=float("inf")), "threshold"),
])
def test_detection_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        detection(RunConfig(nodes=16, steps=10), **{"window": 5, **kwargs})


def test_t_statistic_and_squares_against_numpy():
    rng = np.random.default_rng(0)
    prox = rng.normal(size=(7, 4, 4))
    prox[:, 0, 1] = 0.0  # no spread, no mean: 0
    prox[:, 0, 2] = -2.0  # no spread, a mean: -inf
    W = np.full((7, 4, 4), 0.25)
    an = anomaly
    total = np.asarray(an.accumulate(prox, W))
    square = np.asarray(an.accumulate_squares(prox, W))
    per_step = prox / 0.25
    np.testing.assert_allclose(square, (per_step ** 2).sum(0), rtol=1e-12)
    t = np.asarray(an.t_statistic(total, square, 7))
    m, sd = per_step.mean(0), per_step.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = m / (sd / np.sqrt(7))
    expect[0, 1], expect[0, 2] = 0.0, -np.inf
    np.testing.assert_allclose(t, expect, rtol=1e-9)
    with pytest.raises(ValueError, match="prox"):
        an.accumulate_squares(prox[0], W[0])


def test_update_norms_against_a_loop():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    traj = simulate(loss, params, batches, tp.ring(4), optax.sgd(0.3))
    got = np.asarray(anomaly.update_norms(traj))
    assert got.shape == (3, 4)
    for t in range(3):
        for k in range(4):
            sq = sum(float(np.sum((np.asarray(h)[t, k] - np.asarray(p)[t, k]) ** 2))
                     for h, p in zip(jax.tree.leaves(traj.half_params),
                                     jax.tree.leaves(traj.params), strict=True))
            np.testing.assert_allclose(got[t, k], np.sqrt(sq), rtol=1e-12)
    with pytest.raises(ValueError, match="record"):
        anomaly.update_norms(simulate(loss, params, batches, tp.ring(4), record=False))


def test_classify_names_free_riders_noise_and_harm():
    n = 6
    edges = np.ones((n, n), bool) & ~np.eye(n, dtype=bool)
    flagged = np.zeros((n, n), bool)
    flagged[:, 3] = True  # everyone's influence test flags node 3
    flagged[3, :] = False
    np.fill_diagonal(flagged, False)
    det = anomaly.Detection(jnp.zeros((n, n)), jnp.zeros((n, n)), jnp.asarray(flagged),
                            jnp.asarray(edges))
    norms = np.array([1.0, 1.1, 0.0, 0.9, 50.0, 1.0])  # 2 free-rides, 4 is outsized
    s = anomaly.classify(det, norms)
    kind = np.asarray(s.kind)
    for k in range(n):
        others = [j for j in range(n) if j != k]
        med = np.median(norms[others])
        for j in others:
            ratio = norms[j] / med
            assert np.isclose(np.asarray(s.relative_norm)[k, j], ratio)
            want = 2 if ratio < 0.1 else 3 if ratio > 5 else 1 if flagged[k, j] else 0
            assert kind[k, j] == want, (k, j)
        assert kind[k, k] == 0
    assert s.suspected() == {2: "low_effort", 3: "harmful", 4: "outsized"}
    m = anomaly.evaluate(det, [2, 4], s.flagged)
    assert m.recall == 1.0 and m.false_positives == n - 1  # node 3's edges are false here
    with pytest.raises(ValueError, match="low"):
        anomaly.classify(det, norms, low=1.5)
    with pytest.raises(ValueError, match="norms"):
        anomaly.classify(det, norms[:3])
