"""The installed ``dicejax`` command in a subprocess: exit codes and the one-line messages of
expected failures (no traceback), Ctrl-C, resuming, ``--help`` and ``--version``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("dicejax")
TINY = ["--nodes", "4", "--batch", "8", "--eval-every", "0", "--probe-size", "16",
        "--test-size", "64"]


def dicejax(*args: str, timeout: float = 180, cwd: Path | None = None):
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_version():
    done = dicejax("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    import dicejax as dj

    assert done.stdout.startswith(f"dicejax {dj.__version__} (jax ")


def test_help_documents_every_option_and_the_exit_codes():
    done = dicejax("train", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = one_line(done.stdout)
    for flag, default in [("--nodes", "16"), ("--lr", "0.1"), ("--batch", "16"),
                          ("--steps", "300"), ("--eval-every", "50"), ("--probe-size", "128"),
                          ("--seed", "0"), ("--test-size", "0")]:
        assert flag in text and f"(default: {default})" in text, flag
    for flag in ("--samples-per-node", "--checkpoint-dir", "--chunk-steps", "--data-dir"):
        assert flag in text
    assert "exit codes: 0 success; 2 bad option" in text and "130 interrupted" in text


def test_unwritable_out_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    tic = time.perf_counter()
    done = dicejax("train", *TINY, "--steps", "100000", "--out", str(blocker / "out"))
    took = time.perf_counter() - tic
    assert done.returncode == 2
    assert "--out" in done.stderr and "cannot write" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "training" not in done.stdout  # no progress bar: nothing was trained
    assert took < 60  # 100,000 steps would take minutes


@pytest.mark.slow
def test_divergence_is_one_line_with_step_node_and_hint(tmp_path):
    done = dicejax("train", *TINY, "--steps", "40", "--lr", "1000", "--out", str(tmp_path))
    assert done.returncode == 3, done.stderr
    err = one_line(done.stderr)
    assert "Traceback" not in done.stderr
    assert "error: training diverged" in err and "at step" in err and "node" in err
    assert "lower --lr (it is 1000)" in err
    assert not (tmp_path / "train.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_with_where_and_how_to_resume(tmp_path):
    ck = tmp_path / "ck"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [str(SCRIPT), "train", *TINY, "--steps", "1000000", "--chunk-steps", "50",
         "--checkpoint-dir", str(ck), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any((ck / "state").glob("[0-9]*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert any((ck / "state").glob("[0-9]*")), "no checkpoint within 120 s"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out
    line = one_line(err)
    assert "interrupted at step" in line and "of 1000000" in line
    assert "rerun the same command to resume" in line
    from dicejax.checkpoint import latest_step

    said = int(line.split("interrupted at step ")[1].split()[0])
    assert said >= 50 and latest_step(ck) >= said  # the step it names is saved


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_resume_message_and_a_finished_run_rerun(tmp_path, capsys):
    from dicejax.cli import main

    ck, out = tmp_path / "ck", tmp_path / "out"
    argv = ["train", *TINY, "--steps", "6", "--chunk-steps", "2", "--checkpoint-dir", str(ck),
            "--out", str(out)]
    assert main(argv) == 0  # in-process: the first run and the rerun of the finished one
    # what a kill after the checkpoint at step 4 leaves: drop the last commit
    shutil.rmtree(ck / "state" / "6")
    shutil.rmtree(ck / "history" / "6")
    again = dicejax(*argv)
    assert again.returncode == 0, again.stderr
    assert "resuming from step 4 of 6" in one_line(again.stdout)
    import json

    assert json.loads((out / "train.json").read_text())["resumed_from"] == 4
    capsys.readouterr()
    assert main(argv) == 0
    text = one_line(capsys.readouterr().out)
    assert "holds the finished run (6 of 6 steps)" in text
    assert "node-steps/s" not in text and "no steps run" in text  # no bogus rate
