"""Tests for adaptive attackers in the detection experiment and ``dicejax detect``.

Partial label noise (``--attack label_noise --fraction F``) and intermittent attackers
(``--on K --off K``) in :mod:`dicejax.experiments.anomaly`, each checked against its
definition in :mod:`dicejax.attacks` on the streamed batches; the strength curve over the
label-noise fraction and over the duty cycle on a tiny digits run; the command's checks.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dicejax import attacks
from dicejax.cli import main
from dicejax.commands import options
from dicejax.experiments import anomaly as exp
from dicejax.experiments.common import RunConfig, build

T, N, B = 9, 4, 16
CONFIG = RunConfig(nodes=N, steps=T, batch=B, probe_size=16, test_size=64, eval_every=0)
TINY = RunConfig(nodes=8, steps=12, batch=8, probe_size=32, test_size=64, eval_every=0)
TINY_ARGS = ["--dataset", "digits", "--nodes", "8", "--batch", "8", "--steps", "12",
             "--probe-size", "32", "--test-size", "64", "--eval-every", "0", "--window", "6",
             "--seeds", "1", "--seed", "1", "--attackers", "3"]


@pytest.fixture(scope="module")
def setup():
    return build(CONFIG)


def whole(source, chunk=None):
    """Steps [0, T) of a source, in one call or in chunks of ``chunk`` steps."""
    if chunk is None:
        return source(0, T)
    parts = [source(a, min(a + chunk, T)) for a in range(0, T, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_mirrors_and_duty_off():
    assert options.DETECT_ATTACKS == exp.DETECTION_ATTACKS
    assert options.ATTACKS == exp.ATTACKS  # the attacks other experiments take: unchanged
    assert [exp.duty_off(d) for d in (1, 0.5, 0.25, 0.1)] == [0, 1, 3, 9]
    assert exp.duty_off(0.5, on=2) == 2 and exp.duty_off(0.4, on=2) == 3
    for d in (1, 0.5, 0.25, 0.1, 1 / 3):
        off = exp.duty_off(d)
        assert 1 / (1 + off) == pytest.approx(d)
    for bad in (0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="duty"):
            exp.duty_off(bad)
    with pytest.raises(ValueError, match="on"):
        exp.duty_off(0.5, on=0)
    assert exp.intermittent_steps(T) is None and exp.intermittent_steps(T, 3, 0) is None
    assert exp.intermittent_steps(T, 2, 3, 1) == attacks.alternating_steps(T, 2, 3, 1)
    with pytest.raises(ValueError, match="off"):
        exp.intermittent_steps(T, 1, -1)


@pytest.mark.parametrize(("fraction", "on", "off"), [(0.25, 1, 0), (0.5, 1, 2), (1.0, 2, 1),
                                                     (0.1, 1, 1)])
def test_label_noise_stream_against_its_definition(setup, fraction, on, off):
    attackers = [1, 3]
    source, scale = exp.attacked_stream(setup, "label_noise", attackers, 7, fraction=fraction,
                                        on=on, off=off)
    assert scale is None
    clean, noisy = whole(setup.source), whole(source)
    np.testing.assert_array_equal(noisy["x"], clean["x"])  # inputs untouched
    attacked = np.asarray(attacks.alternating_mask(T, N, attackers, on, off))
    changed = (noisy["y"] != clean["y"]).sum(axis=-1)  # [T, n] wrong labels per batch
    np.testing.assert_array_equal(changed, np.where(attacked, round(fraction * B), 0))
    assert noisy["y"].min() >= 0 and noisy["y"].max() < setup.dataset.num_classes
    # chunking does not change the batches; the seed determines them
    for chunk in (1, 4):
        np.testing.assert_array_equal(whole(source, chunk)["y"], noisy["y"])
    again, _ = exp.attacked_stream(setup, "label_noise", attackers, 7, fraction=fraction,
                                   on=on, off=off)
    np.testing.assert_array_equal(whole(again)["y"], noisy["y"])
    other, _ = exp.attacked_stream(setup, "label_noise", attackers, 8, fraction=fraction,
                                   on=on, off=off)
    assert not np.array_equal(whole(other)["y"], noisy["y"])
    # the same batches as attacks.label_noise on the whole run (apply_attack)
    corruption = exp.corruption_for("label_noise", fraction=fraction,
                                    num_classes=setup.dataset.num_classes)
    batches, _ = exp.apply_attack(setup, "label_noise", corruption, attackers, 7, on=on, off=off)
    np.testing.assert_array_equal(np.asarray(batches["y"]), noisy["y"])


@pytest.mark.parametrize("attack", ["label_permutation", "label_flip", "gaussian_noise"])
def test_intermittent_data_attack_hits_exactly_the_alternating_steps(setup, attack):
    on, off, attackers = 2, 3, [0, 2]
    source, _ = exp.attacked_stream(setup, attack, attackers, 5, std=4.0, on=on, off=off)
    always, _ = exp.attacked_stream(setup, attack, attackers, 5, std=4.0)
    mask = np.asarray(attacks.alternating_mask(T, N, attackers, on, off))
    np.testing.assert_array_equal(source.step_mask(0, T, N), mask)
    np.testing.assert_array_equal(source.step_mask(3, 7, N), mask[3:7])
    clean, got, full = whole(setup.source), whole(source, 2), whole(always)
    for key in ("x", "y"):
        axes = tuple(range(2, clean[key].ndim))
        differs = (got[key] != clean[key]).any(axis=axes)
        assert not differs[~mask].any()  # honest steps and nodes: bit for bit the clean batch
        # attacked steps: what the always-on attacker sends there
        np.testing.assert_array_equal(got[key][mask], full[key][mask])
    changed = (got["x" if attack == "gaussian_noise" else "y"] !=
               clean["x" if attack == "gaussian_noise" else "y"])
    assert changed.reshape(T, N, -1).any(-1)[mask].mean() > 0.9  # they do attack there
    if attack == "label_permutation":  # still a permutation of each batch
        np.testing.assert_array_equal(np.sort(got["y"], -1), np.sort(clean["y"], -1))
    spec = source.spec()["attack"]
    assert (spec["on"], spec["off"], spec["phase"]) == (on, off, 0)
    assert "on" not in always.spec()["attack"]  # always-on: the fingerprint of before


@pytest.mark.parametrize("attack", ["sign_flip", "free_rider"])
def test_intermittent_update_attack_gates(setup, attack):
    _, scale = exp.attacked_stream(setup, attack, [1], 0, on=1, off=2, phase=1)
    want = attacks.UPDATE_ATTACKS[attack](T, N, [1], attacks.alternating_steps(T, 1, 2, 1))
    np.testing.assert_array_equal(scale, np.asarray(want))
    _, always = exp.attacked_stream(setup, attack, [1], 0)
    np.testing.assert_array_equal(always, np.asarray(attacks.UPDATE_ATTACKS[attack](T, N, [1])))


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(attack="label_noise", fraction=0.0), "fraction"),
    (dict(attack="label_noise", fraction=1.5), "fraction"),
    (dict(attack="label_noise", fraction=0.01), "fraction"),  # round(0.01 * 16) = 0
    (dict(on=0, off=1), "on"),
    (dict(off=-1), "off"),
    (dict(on=1.5, off=1), "on"),
])
def test_detection_validation_of_adaptive_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        exp.detection(CONFIG, **{"window": 5, **kwargs})


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(attack="label_noise", strengths=[0.5, 1.5]), "strengths"),
    (dict(attack="label_noise", strengths=[0.5], sweep="std"), "sweep"),
    (dict(attack="gaussian_noise", strengths=[0.5], sweep="fraction"), "sweep"),
    (dict(attack="label_permutation", strengths=[0.5]), "sweep"),  # needs sweep="duty"
    (dict(attack="label_permutation", strengths=[0.5], sweep="speed"), "sweep"),
    (dict(attack="label_permutation", strengths=[1, 2], sweep="duty"), "strengths"),
    (dict(attack="label_noise", strengths=[0.5, 0.01]), "fraction"),  # checked before work
    (dict(attack="backdoor", strengths=[1]), "attack"),
])
def test_strength_curve_validation(kwargs, name):
    strengths = kwargs.pop("strengths")
    with pytest.raises(ValueError, match=name):
        exp.strength_curve(CONFIG, strengths, window=5, **kwargs)


def check_points(curve, n):
    assert len(curve["points"]) == n
    for point in curve["points"]:
        assert np.isfinite(point["roc_auc"]["mean"])
        assert 0 <= point["roc_auc"]["mean"] <= 1
        assert np.isfinite(point["honest_accuracy"]["mean"])


def test_label_noise_fraction_curve_on_a_tiny_run():
    curve = exp.strength_curve(TINY, [0.25, 1.0], attackers=[3], window=6, seeds=[1],
                               attack="label_noise")
    assert curve["sweep"] == "fraction" and curve["strengths"] == [0.25, 1.0]
    assert curve["stds"] is None and curve["attack"] == "label_noise"
    check_points(curve, 2)
    assert [p["fraction"] for p in curve["points"]] == [0.25, 1.0]
    assert [p["mislabelled"] for p in curve["points"]] == [2, 8]


def test_duty_curve_on_a_tiny_run():
    curve = exp.strength_curve(TINY, [1, 0.5, 0.25], attackers=[3], window=6, seeds=[1],
                               attack="label_permutation", sweep="duty")
    assert curve["sweep"] == "duty" and curve["strengths"] == [1.0, 0.5, 0.25]
    check_points(curve, 3)
    points = curve["points"]
    assert [(p["on"], p["off"]) for p in points] == [(1, 0), (1, 1), (1, 3)]
    assert [p["duty"] for p in points] == [1.0, 0.5, 0.25]
    # attacked steps among the last 6 of 12: every one, 6, 7, ..., 11 with t % 2 == 0, t = 8
    assert [p["attacked_steps_scored"] for p in points] == [6, 3, 1]
    # duty 1 is the attacker of every step: the same run as a plain detection
    alone = exp.detection(TINY, "label_permutation", attackers=[3], window=6, seeds=[1])
    np.testing.assert_array_equal(np.asarray(points[0]["per_seed"][0]["scores"], float),
                                  np.asarray(alone["per_seed"][0]["scores"], float))


def printed_text(capsys) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + " " + captured.err).split())


def test_cli_intermittent_label_noise_and_duty_curve(tmp_path):
    one = tmp_path / "one"
    argv = ["detect", *TINY_ARGS, "--attack", "label_noise", "--fraction", "0.25", "--on", "1",
            "--off", "1", "--out", str(one)]
    assert main(argv) == 0
    result = json.loads((one / "detect.json").read_text())
    assert (result["attack"], result["fraction"], result["mislabelled"]) == \
        ("label_noise", 0.25, 2)
    assert (result["on"], result["off"], result["duty"]) == (1, 1, 0.5)
    assert (one / "detect_roc.png").read_bytes()[:4] == b"\x89PNG"
    curve = tmp_path / "curve"
    argv = ["detect", *TINY_ARGS, "--attack", "gaussian_noise", "--std", "3", "--duties",
            "1,0.5", "--out", str(curve)]
    assert main(argv) == 0
    saved = json.loads((curve / "detect_strength.json").read_text())
    assert saved["sweep"] == "duty" and saved["strengths"] == [1.0, 0.5]
    assert saved["std"] == 3.0 and [p["std"] for p in saved["points"]] == [3.0, 3.0]
    assert [p["off"] for p in saved["points"]] == [0, 1]
    assert all(np.isfinite(p["roc_auc"]["mean"]) for p in saved["points"])
    assert (curve / "detect_strength.png").read_bytes()[:4] == b"\x89PNG"


def test_help_documents_the_adaptive_flags(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = printed_text(capsys)
    for flag in ("--fraction", "--on", "--off", "--duties", "label_noise", "round(on/D)"):
        assert flag in text, flag


def test_gaussian_noise_stream_always_on_unchanged(setup):
    """The per-step mask keeps the draws of an always-on attacker: fold_in(key, t)."""
    source, _ = exp.attacked_stream(setup, "gaussian_noise", [2], 4, std=2.0)
    clean, got = whole(setup.source), whole(source, 3)
    key = jax.random.PRNGKey(4)
    for t in (0, 5):
        noise = jax.random.normal(jax.random.fold_in(key, t), clean["x"][t].shape,
                                  clean["x"].dtype)
        np.testing.assert_allclose(got["x"][t, 2], clean["x"][t, 2] + 2.0 * np.asarray(noise)[2],
                                   rtol=1e-6)
        np.testing.assert_array_equal(got["x"][t, [0, 1, 3]], clean["x"][t, [0, 1, 3]])
