"""``--checkpoint-dir`` of the multi-part commands: a rerun skips what is stored, recomputes
what is missing, and ends with the same result (issue 19, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicejax.cli import main
from dicejax.experiments.common import ResultStore

TINY = ["--nodes", "4", "--batch", "8", "--eval-every", "0", "--probe-size", "16",
        "--test-size", "48"]


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    result.pop("meta")
    result.pop("wall_seconds", None)
    return result


def drop_times(obj):
    """The result without wall times (they differ between runs)."""
    if isinstance(obj, dict):
        return {k: drop_times(v) for k, v in obj.items()
                if k not in ("wall_seconds", "opt_seconds")}
    if isinstance(obj, list):
        return [drop_times(v) for v in obj]
    return obj


def test_result_store_refuses_another_experiment_and_ignores_damage(tmp_path):
    store = ResultStore(tmp_path, {"experiment": "x", "n": 1})
    store.put("a", {"v": np.arange(3)})
    np.testing.assert_array_equal(ResultStore(tmp_path, {"n": 1, "experiment": "x"})
                                  .get("a")["v"], np.arange(3))
    with pytest.raises(ValueError, match=r"checkpoint_dir: .* different run \(n differ\)"):
        ResultStore(tmp_path, {"experiment": "x", "n": 2})
    (tmp_path / "b.pkl").write_bytes(b"half a pickle")
    assert store.get("b") is None and store.get("missing") is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_detect_single_seed_then_resumes_with_the_next_seed(tmp_path, capsys):
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["detect", *TINY, "--steps", "10", "--window", "4", "--seeds", "1",
            "--out", str(out), "--checkpoint-dir", str(ck)]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = printed[printed.index("Anomaly detection:"):]  # the table and the summary
    assert "±" not in report and "1 seeds" not in report and " std " not in report
    assert "seed 0" in report and "time (s)" in report and "wall seconds" in report
    argv[argv.index("--seeds") + 1] = "2"
    assert main(argv) == 0  # seed 0 comes from the folder
    first = load(out / "detect.json")
    assert [r["seed"] for r in first["per_seed"]] == [0, 1]
    (ck / "seed_1.pkl").unlink()  # as if stopped during the second seed
    assert main(argv) == 0
    assert drop_times(load(out / "detect.json")) == drop_times(first)


@pytest.mark.slow
def test_contribute_resumes_after_training(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["contribute", *TINY, "--steps", "4", "--permuted", "1", "--free-riders", "2",
            "--no-proximal",
            "--out", str(out), "--checkpoint-dir", str(ck)]
    assert main(argv) == 0
    first = load(out / "contribute.json")
    (ck / "result.pkl").unlink()  # as if stopped during the attribution
    assert main(argv) == 0  # the stored training run is used
    assert drop_times(load(out / "contribute.json")) == drop_times(first)


@pytest.mark.slow
def test_topo_opt_resumes_with_the_next_seed(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["topo-opt", *TINY, "--steps", "4", "--eval-every", "2", "--seeds", "2",
            "--opt-steps", "0", "--val-size", "16", "--baselines", "uniform,ring",
            "--out", str(out), "--checkpoint-dir", str(ck)]
    assert main(argv) == 0
    first = load(out / "topo_opt.json")
    (ck / "seed_1.pkl").unlink()
    assert main(argv) == 0
    assert drop_times(load(out / "topo_opt.json")) == drop_times(first)


@pytest.mark.slow
def test_rewire_resumes_with_the_next_arm(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    argv = ["rewire", *TINY, "--steps", "6", "--period", "3", "--seeds", "1",
            "--arms", "fixed,influence", "--attackers", "1", "--out", str(out),
            "--checkpoint-dir", str(ck)]
    assert main(argv) == 0
    first = load(out / "rewire.json")
    (ck / "seed_0_influence.pkl").unlink()
    assert main(argv) == 0
    assert drop_times(load(out / "rewire.json")) == drop_times(first)
