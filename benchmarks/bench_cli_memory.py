"""Peak resident memory of ``dicejax train`` against the number of steps (issue 19, item 1).

Every run is its own process (``dicejax train ...``), started by a small wrapper process
that reports the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a process
with that one child: the same number ``/usr/bin/time -v`` calls "Maximum resident set
size"). The batches are streamed chunk by chunk, so the peak should not grow with
``--steps``; before streaming, 60,000 steps peaked at 12.1 GB.

    .venv/bin/python benchmarks/bench_cli_memory.py            # 3,000 and 60,000 steps
    .venv/bin/python benchmarks/bench_cli_memory.py --steps 600 6000 --no-checkpoint

Writes ``benchmarks/results/bench_cli_memory.json`` (atomically) with the commands, the
peaks, wall times and the load averages before and after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_cli_memory.json"
SETTING = ["--dataset", "digits", "--nodes", "16", "--topology", "exponential", "--model",
           "mlp", "--lr", "0.1", "--batch", "16", "--eval-every", "0"]
WRAPPER = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
           "capture_output=True, text=True); print(json.dumps({'rc': r.returncode, "
           "'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
           "'tail': (r.stdout + r.stderr)[-600:]}))")


def peak_rss(command: list[str]) -> dict:
    """Runs ``command`` as the only child of a fresh wrapper; its peak RSS and wall time."""
    load_before = os.getloadavg()
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True,
                          text=True, check=True)
    seconds = time.perf_counter() - tic
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"command": shlex.join(command), "returncode": out["rc"],
            "peak_rss_mib": out["peak_kib"] / 1024, "wall_seconds": seconds,
            "load_before": load_before, "load_after": os.getloadavg(), "output_tail": out["tail"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[3000, 60000])
    p.add_argument("--no-checkpoint", action="store_true",
                   help="skip the runs with --checkpoint-dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    script = str(Path(sys.executable).with_name("dicejax"))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in a.steps:
            for checkpoint in ([False] if a.no_checkpoint else [False, True]):
                cmd = [script, "train", *SETTING, "--steps", str(steps),
                       "--out", f"{tmp}/out_{steps}"]
                if checkpoint:
                    cmd += ["--checkpoint-dir", f"{tmp}/ck_{steps}"]
                run = peak_rss(cmd)
                run.update(steps=steps, checkpoint=checkpoint)
                runs.append(run)
                print(f"{steps:>7} steps{' +checkpoints' if checkpoint else '':13}: peak RSS "
                      f"{run['peak_rss_mib']:7.0f} MiB, {run['wall_seconds']:6.1f} s, load "
                      f"{run['load_before'][0]:.2f} -> {run['load_after'][0]:.2f}, rc "
                      f"{run['returncode']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=a.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "cpu_count": os.cpu_count(), "runs": runs}, f, indent=2)
    os.replace(tmp_path, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
