"""Tests for the ``dicejax`` command, run in-process on tiny settings.

Subprocess tests (exit codes, Ctrl-C, resume, --help, --version) are in
``test_cli_process.py``; own data and models in ``test_cli_data.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dicejax import topology as tp
from dicejax.cli import build_parser, main
from dicejax.commands import options

N = 4
TINY = ["--nodes", str(N), "--batch", "8", "--eval-every", "3", "--probe-size", "16",
        "--test-size", "64", "--topology", "ring"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"dicejax", "jax", "jaxlib", "python", "backend", "date", "command", "argv", "seed"}


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


# ---------------------------------------------------------------------------------------------
# Commands that work


def test_train_writes_json_with_provenance_and_figure(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["train", *TINY, "--steps", "6", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    summary = strict_load(out / "train.json")
    assert len(summary["per_node_accuracy"]) == N
    assert all(0 <= a <= 1 for a in summary["per_node_accuracy"])
    assert summary["config"]["nodes"] == N and summary["config"]["steps"] == 6
    assert summary["mean_accuracy"] == pytest.approx(np.mean(summary["per_node_accuracy"]))
    assert summary["eval_curve"]["step"] == [3, 6]
    assert len(summary["train_loss_curve"]) == 6
    q = summary["train_loss_quantiles"]
    assert np.all(np.asarray(q["min"]) <= np.asarray(q["median"]))
    assert np.all(np.asarray(q["median"]) <= np.asarray(q["max"]))
    assert len(summary["consensus_distance"]) == 6
    meta = summary["meta"]
    assert META_KEYS <= set(meta)
    assert meta["command"] == "dicejax " + " ".join(argv) and meta["seed"] == 3
    assert meta["dicejax"] and meta["jax"] and meta["date"][:2] == "20"
    assert_png(out / "train.png")
    assert_no_temp_files(out)
    printed = printed_text(capsys)
    assert "mean test accuracy" in printed and "train.json" in printed
    assert "loss (nats)" in printed  # units in the table


@pytest.mark.slow
def test_align_writes_json_and_named_figures(tmp_path, capsys):
    out = tmp_path / "align"
    argv = ["align", *TINY, "--steps", "6", "--hops", "2", "--num-steps", "2",
            "--out", str(out)]
    assert main(argv) == 0
    result = strict_load(out / "align.json")
    assert result["steps"] == [0, 4]
    assert result["pairs_per_hop"] == 2 * N
    assert np.asarray(result["scores"]["gt"], dtype=float).shape == (2, 2, N)
    assert set(result["shells"]) == {"E1 (paper)", "E1 + exact direct", "E2",
                                     "E2 + exact direct"}
    for row in result["shells"].values():
        assert set(row) == {"1", "2"}
        for corr in row.values():
            for value in corr.values():
                assert value is None or -1 - 1e-12 <= value <= 1 + 1e-12
    assert result["meta"]["command"].startswith("dicejax align")
    for stem in ("E1_paper", "E1_exact_direct", "E2", "E2_exact_direct"):
        assert_png(out / f"align_{stem}.png")  # the estimator is in the file name
    assert_no_temp_files(out)
    printed = printed_text(capsys)
    assert "DICE-E vs DICE-GT" in printed and "align.json" in printed


@pytest.mark.slow
def test_align_checkpoint_dir_resumes_scored_steps(tmp_path, capsys):
    out, ck = tmp_path / "align", tmp_path / "ck"
    argv = ["align", *TINY, "--steps", "6", "--hops", "2", "--num-steps", "2",
            "--out", str(out), "--checkpoint-dir", str(ck)]  # compiled as in the test above
    assert main(argv) == 0
    first = strict_load(out / "align.json")
    assert first["resumed_scores"] == 0
    capsys.readouterr()
    assert main(argv) == 0  # everything is stored: nothing is scored again
    again = strict_load(out / "align.json")
    assert again["resumed_scores"] == 2 and again["scoring_seconds"] == 0
    assert again["scores"] == first["scores"]
    assert again["train"]["per_node_accuracy"] == first["train"]["per_node_accuracy"]
    assert "2 scored steps restored" in printed_text(capsys)
    other = [*argv[:-4], "--hops", "1", "--out", str(out), "--checkpoint-dir", str(ck)]
    assert main(other) == 2  # a different experiment in the same folder is refused
    printed = printed_text(capsys)
    assert "--checkpoint-dir" in printed and "different run" in printed


# ---------------------------------------------------------------------------------------------
# Checks before any work: each of these fails in well under a second of work


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--nodes", "1"], "--nodes"),
        (["train", "--nodes", "0"], "--nodes"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--optimizer", "rmsprop"], "--optimizer"),
        (["train", "--dataset", "imagenet"], "--dataset"),
        (["train", "--model", "transformer"], "--model"),
        (["train", "--partition", "by_label"], "--partition"),
        (["train", "--topology", "nosuchgraph"], "--topology"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--dataset", "mnist"], "--data-dir"),
        (["train", "--batch", "16", "--samples-per-node", "8"], "--samples-per-node"),
        (["align", "--steps", "3", "--hops", "5"], "--hops"),
        (["align", "--steps", "10", "--hops", "3", "--num-steps", "9"], "--num-steps"),
        (["detect", "--steps", "10", "--window", "11"], "--window"),
        (["detect", "--nodes", "8", "--attackers", "9"], "--attackers"),
        (["detect", "--nodes", "8", "--attackers", "random:8"], "--attackers"),
        (["detect", "--attack", "backdoor"], "--attack"),
        (["detect", "--strengths", "1,3"], "--strengths"),  # needs gaussian_noise
        (["detect", "--attack", "gaussian_noise", "--strengths", "1,-3"], "--strengths"),
        (["detect", "--attack", "gaussian_noise", "--strengths", "1,,3"], "--strengths"),
        (["detect", "--attack", "label_noise", "--fraction", "1.5"], "--fraction"),
        (["detect", "--attack", "label_noise", "--fraction", "0"], "--fraction"),
        (["detect", "--attack", "label_noise", "--batch", "16", "--fraction", "0.01"],
         "--fraction"),
        (["detect", "--attack", "label_noise", "--strengths", "0.5,2"], "--strengths"),
        (["detect", "--attack", "label_noise", "--batch", "8", "--strengths", "0.05,1"],
         "--strengths"),
        (["detect", "--attack", "sign_flip", "--strengths", "0.5"], "--strengths"),
        (["detect", "--duties", "0.5,1.5"], "--duties"),
        (["detect", "--duties", "0,0.5"], "--duties"),
        (["detect", "--attack", "gaussian_noise", "--duties", "0.5", "--strengths", "1"],
         "--duties"),
        (["detect", "--duties", "0.5", "--off", "3"], "--off"),
        (["detect", "--on", "0"], "--on"),
        (["detect", "--off", "-1"], "--off"),
        (["detect", "--attack", "label-noise"], "--attack"),
        (["rewire", "--nodes", "8", "--keep", "8"], "--keep"),
        (["rewire", "--steps", "20", "--period", "20"], "--period"),
        (["rewire", "--arms", "fixed,magic"], "--arms"),
        (["rewire", "--attack", "label_noise", "--fraction", "2"], "--fraction"),
        (["rewire", "--attack", "label_noise", "--fraction", "0.01"], "--fraction"),
        (["rewire", "--off", "-1"], "--off"),
        (["contribute", "--nodes", "8", "--permuted", "3", "--free-riders", "3"],
         "--free-riders"),
        (["contribute", "--nodes", "8", "--permuted", "9"], "--permuted"),
        (["cascade", "--steps", "10", "--hops", "3", "--placements", "4"], "--placements"),
        (["cascade", "--matrix", "no_such_matrix.csv"], "--matrix"),
        (["topo-opt", "--nodes", "6", "--max-degree", "6"], "--max-degree"),
        (["topo-opt", "--objective", "speed"], "--objective"),
    ],
)
def test_bad_option_is_refused_before_any_work(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    try:
        code = main([*argv, "--out", str(out)])
    except SystemExit as e:  # argparse: types and choices
        code = e.code
    assert code == options.EXIT_USAGE
    printed = printed_text(capsys)
    assert "error" in printed and flag in printed, printed
    assert "Traceback" not in printed
    assert not out.exists() or not any(out.glob("*.json"))  # no work was done
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_unwritable_out_names_the_flag(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["train", "--nodes", "2", "--steps", "2", "--out", str(blocker / "sub")]) == 2
    printed = printed_text(capsys)
    assert "--out" in printed and "cannot write" in printed


def test_matrix_hint_names_the_folder_and_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cascade", "--matrix", "other16.csv", "--out", str(tmp_path / "o")]) == 2
    printed = printed_text(capsys)
    assert str(tmp_path) in printed and "omit --matrix" in printed


def test_empty_topology_csv_is_one_clear_line(tmp_path, capsys):
    import warnings

    path = tmp_path / "empty.csv"
    path.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning before the message
        with pytest.raises(SystemExit) as info:
            main(["train", "--nodes", "4", "--topology", str(path), "--out", str(tmp_path)])
    assert info.value.code == 2
    printed = printed_text(capsys)
    assert "--topology" in printed and "is empty" in printed


def test_brackets_in_errors_are_printed_verbatim(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    path.write_text("0.5,0.5,0\n0.5,0.5,0\n")  # 2 x 3: not [n, n]
    assert main(["train", "--nodes", "2", "--steps", "2", "--topology", str(path),
                 "--out", str(tmp_path / "o")]) == 2
    printed = printed_text(capsys)
    assert "[n, n]" in printed and "[P * n, n]" in printed  # rich markup did not eat them


def test_missing_topology_csv_names_the_flag(tmp_path, capsys):
    argv = ["train", "--nodes", "4", "--steps", "2", "--topology",
            str(tmp_path / "absent.csv"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "--topology" in printed_text(capsys)


def test_topology_csv_node_mismatch_names_the_flag(tmp_path, capsys):
    path = tmp_path / "ring5.csv"
    tp.save_csv(tp.ring(5), path)
    argv = ["train", "--nodes", "4", "--steps", "2", "--topology", str(path),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    printed = printed_text(capsys)
    assert "--topology" in printed and "5 nodes" in printed


def test_missing_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------
# Help, names, messages


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"train", "align", "detect", "rewire", "contribute", "cascade",
                             "topo-opt"}
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[0]
            assert action.help and len(action.help) > 10, (name, flag)
            if "(default" in action.help:  # stated in words, e.g. "(default: random:1)"
                assert text.count("(default") >= 1
                continue
            if action.default is not None and action.default is not False:
                expected = f"(default: {action.default})"
                assert expected in text, (name, flag, expected)
        assert "exit codes" in text


def test_option_names_mirror_the_library():
    from dicejax import topology_opt
    from dicejax.experiments import RunConfig, anomaly, rewire
    from dicejax.experiments import topology_opt as topo_exp
    from dicejax.experiments.common import OPTIMIZERS
    from dicejax.topology import _BY_NAME

    assert set(options.TOPOLOGIES) == set(_BY_NAME)
    assert options.ATTACKS == anomaly.ATTACKS
    assert options.ARMS == rewire.ARMS
    assert options.ALL_ARMS == rewire.ALL_ARMS
    assert set(options.OBJECTIVES) == set(topology_opt.OBJECTIVES)
    assert set(options.PARAMETERIZATIONS) == set(topo_exp.PARAMETERIZATIONS)
    assert options.BASELINES == topo_exp.BASELINES
    assert options.OPTIMIZERS == OPTIMIZERS
    import dataclasses

    assert options.RUN_DEFAULTS == dataclasses.asdict(RunConfig())


def test_library_messages_name_the_flag():
    parser = _subparsers(build_parser())["align"]
    assert options.flag_message("nodes: must be positive", parser) == "--nodes: must be positive"
    assert options.flag_message("num_steps: too many", parser) == "--num-steps: too many"
    assert options.flag_message("load_csv: bad table", parser) == "--topology: bad table"
    assert options.flag_message("name: cannot import x", parser, "--model") == \
        "--model: cannot import x"
    assert options.flag_message("no_such_param: x", parser) == "no_such_param: x"
    assert options.flag_message("plain message", parser) == "plain message"


def test_interruption_messages():
    from rich.console import Console

    from dicejax.commands.progress import Interrupted, Tracker

    console = Console(file=open("/dev/null", "w"))
    with pytest.raises(Interrupted, match=r"at step 40 of 100; rerun the same command"):
        with Tracker(console, resumable=True) as t:
            bar = t.bar("training", 100)
            t.update(bar, 40)
            raise KeyboardInterrupt
    with pytest.raises(Interrupted, match=r"seed 2 of 3, step 5 of 9; nothing was kept"):
        with Tracker(console, resumable=False) as t:
            seeds = t.bar("seeds", 3, "seeds", noun="seed", ordinal=True)
            steps = t.bar("steps", 9)
            t.update(seeds, 1)
            t.update(steps, 5)
            raise KeyboardInterrupt


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from dicejax import report

    path = tmp_path / "fig.png"
    fig, _ = report.figure(1, 1, 2, 2, "title")
    report.save_figure(fig, path)
    assert_png(path)
    before = path.read_bytes()
    fig, _ = report.figure(1, 1, 2, 2, "title")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", fail)
    with pytest.raises(OSError):
        report.save_figure(fig, path)
    assert path.read_bytes() == before  # the old figure is intact
    assert_no_temp_files(tmp_path)
    plt.close("all")


def test_tables_one_seed_and_merged_identical_topologies():
    from rich.console import Console

    from dicejax.commands import topo_opt

    def stat(v):
        return {"mean": v, "std": 0.0, "values": [v]}

    def row(name, same_as=None):
        return {"name": name, "degree": 4.0, "spectral_gap": stat(0.2), "same_as": same_as,
                **{k: stat(0.5) for k in ("val_loss", "test_loss", "test_accuracy",
                                          "min_accuracy", "consensus")}}

    result = {"seeds": [0], "config": None,
              "topologies": {"learned": row("learned"), "uniform": row("uniform"),
                             "metropolis_hastings": row("mh", same_as="uniform"),
                             "ring": row("ring")}}
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(topo_opt.table(result))
    text = console.export_text()
    assert "uniform = Metropolis–Hastings" in text
    assert text.count("Metropolis–Hastings") == 1  # one row, not two identical ones
    assert "±" not in text and "seed 0" in text


def test_light_import_of_the_cli():
    import subprocess

    code = ("import sys, dicejax.cli; heavy = [m for m in ('matplotlib', 'dicejax.experiments', "
            "'dicejax.report', 'sklearn', 'scipy') if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
