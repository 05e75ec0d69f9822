"""Tests for the ``dicejax`` command, run in-process on tiny settings (and once installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicejax import topology as tp
from dicejax.cli import main

N = 4
TINY = ["--nodes", str(N), "--batch", "8", "--eval-every", "3", "--probe-size", "16",
        "--test-size", "64", "--topology", "ring"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(sys.executable).with_name("dicejax")


def strict_load(path: Path):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def assert_png(path: Path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def printed_text(capsys) -> str:
    """Captured stdout and stderr with rich's line wrapping undone."""
    captured = capsys.readouterr()
    return " ".join((captured.out + " " + captured.err).split())


def assert_no_temp_files(folder: Path):
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_train_writes_json_and_figure(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["train", *TINY, "--steps", "6", "--out", str(out)]) == 0
    summary = strict_load(out / "train.json")
    assert len(summary["per_node_accuracy"]) == N
    assert len(summary["per_node_loss"]) == N
    assert all(0 <= a <= 1 for a in summary["per_node_accuracy"])
    assert summary["config"]["nodes"] == N and summary["config"]["steps"] == 6
    assert summary["config"]["topology"] == "ring"
    assert summary["mean_accuracy"] == pytest.approx(np.mean(summary["per_node_accuracy"]))
    assert summary["eval_curve"]["step"] == [3, 6]
    assert len(summary["train_loss_curve"]) == 6
    assert_png(out / "train.png")
    assert_no_temp_files(out)
    printed = printed_text(capsys)
    assert "mean test accuracy" in printed
    assert "train.json" in printed


def test_align_writes_json_and_figures(tmp_path, capsys):
    out = tmp_path / "align"
    argv = ["align", *TINY, "--steps", "6", "--hops", "2", "--num-steps", "2",
            "--out", str(out)]
    assert main(argv) == 0
    result = strict_load(out / "align.json")
    assert result["steps"] == [0, 4]
    assert result["pairs_per_hop"] == 2 * N
    gt = np.asarray(result["scores"]["gt"], dtype=float)
    assert gt.shape == (2, 2, N)
    assert set(result["shells"]) == {"E1 (paper)", "E1 + exact direct", "E2",
                                     "E2 + exact direct"}
    for row in result["shells"].values():
        assert set(row) == {"1", "2"}
        for corr in row.values():
            for value in corr.values():
                assert value is None or -1 - 1e-12 <= value <= 1 + 1e-12
    assert len(result["train"]["per_node_accuracy"]) == N
    for i in range(4):
        assert_png(out / f"align_{i}.png")
    assert_no_temp_files(out)
    printed = printed_text(capsys)
    assert "DICE-E vs DICE-GT" in printed
    assert "align.json" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--nodes", "0"], "nodes"),
        (["train", "--lr", "-1"], "lr"),
        (["train", "--optimizer", "rmsprop"], "optimizer"),
        (["train", "--nodes", "4", "--steps", "2", "--topology", "nosuchgraph"],
         "nosuchgraph"),
        (["align", "--nodes", "4", "--steps", "3", "--hops", "0"], "hops"),
        (["align", "--nodes", "4", "--steps", "3", "--hops", "5"], "hops"),
    ],
)
def test_bad_argument_returns_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    printed = printed_text(capsys)
    assert "error" in printed
    assert message in printed
    assert not (out / "train.json").exists() and not (out / "align.json").exists()


def test_missing_topology_csv_returns_2(tmp_path, capsys):
    argv = ["train", "--nodes", "4", "--steps", "2", "--topology",
            str(tmp_path / "absent.csv"), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "error" in printed_text(capsys)


def test_topology_csv_node_mismatch_returns_2(tmp_path, capsys):
    path = tmp_path / "ring5.csv"
    tp.save_csv(tp.ring(5), path)
    argv = ["train", "--nodes", "4", "--steps", "2", "--topology", str(path),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    printed = printed_text(capsys)
    assert "error" in printed and "5 nodes" in printed


def test_unparsable_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--nodes", "four"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_missing_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_console_script_help():
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "align" in done.stdout

