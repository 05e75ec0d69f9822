"""Peak memory of ``dicejax train`` does not grow with ``--steps`` (issue 19, item 1).

The full measurement (3,000 and 60,000 steps, with and without checkpoints) is
``benchmarks/bench_cli_memory.py``; this test compares 300 and 6,000 steps. Before the
batches were streamed, the 6,000-step run held 6,000 x 16 x 16 digits (0.4 GB) plus copies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("dicejax")
WRAPPER = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
           "capture_output=True, text=True); print(json.dumps({'rc': r.returncode, "
           "'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
           "'err': r.stderr[-400:]}))")


def peak_mib(steps: int, out: Path) -> float:
    command = [str(SCRIPT), "train", "--nodes", "16", "--steps", str(steps), "--eval-every",
               "0", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True,
                          text=True, timeout=280, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["err"]
    return result["peak_kib"] / 1024


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_peak_memory_does_not_grow_with_steps(tmp_path):
    short = peak_mib(300, tmp_path / "short")
    long = peak_mib(6000, tmp_path / "long")
    assert long < 2048
    assert long - short < 100, (short, long)  # one chunk of batches, not the whole run
