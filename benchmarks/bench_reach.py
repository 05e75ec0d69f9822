"""Influence at scale: time and peak memory of every influence function as ``n`` grows.

The setting of issue 15 (what a new user would call, default options): digits MLP
64-128-64-10, batch 16, SGD lr 0.1, ``T = 12`` recorded steps, source step 4, ``hops = 3``,
float32, all sources. Graphs: ``ring``, ``torus`` (the most square ``rows × cols``),
``regular4`` (random 4-regular, Metropolis–Hastings weights) and ``exponential``.
Functions: ``simulate`` (the recorded 12-step run), ``dice_gt``, ``dice_e`` (order 1),
``dice_e2`` (``order=2, direct="exact"``), ``dice_e_network`` (adjoint), ``proximal`` and
``trajectory_attribution``.

Every (graph, n, function) runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``: the whole process — JAX, the data, the recorded run and the function) is its
own; time is wall-clock seconds of the first call, compilation included. The growth
exponent of each function is the least-squares slope of ``log time`` on ``log n`` over
``n >= 256``. ``--budget-check`` compares, for several chunk sizes, the memory a chunked call
is budgeted by — XLA's buffer assignment of its compiled program
(:func:`dicejax.influence.budget.compiled_bytes`), and the first-guess estimate
(:func:`dicejax.influence.budget.source_bytes` × chunk) — with the peak resident memory the
call adds: its first call (compilation included) and a second one (execution only; the
peak is reset through ``/proc/self/clear_refs`` in between).

Usage::

    python benchmarks/bench_reach.py                                  # the CPU sweep
    python benchmarks/bench_reach.py --nodes 16,64,256 --graphs ring --functions dice_e
    python benchmarks/bench_reach.py --budget-check
    python benchmarks/bench_reach.py --nodes 1024,4096,16384,65536    # a GPU

JSON goes to ``benchmarks/results/bench_reach.json``, the log-log figure to
``benchmarks/results/bench_reach.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, git_state, load_average, machine_info, write_json

FUNCTIONS = ("simulate", "dice_gt", "dice_e", "dice_e2", "dice_e_network", "proximal",
             "trajectory_attribution")
GRAPHS = ("ring", "torus", "regular4", "exponential")
STEPS, SOURCE_STEP, HOPS, BATCH, LR = 12, 4, 3, 16, 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="16,64,256,1024,4096")
    p.add_argument("--graphs", default=",".join(GRAPHS))
    p.add_argument("--functions", default=",".join(FUNCTIONS))
    p.add_argument("--skip", default="", help="comma list of graph:n pairs not to run "
                   "(e.g. exponential:4096)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--budget-check", action="store_true")
    p.add_argument("--budget-nodes", type=int, default=1024,
                   help="ring size of --budget-check (chunks of n/16, n/4 and n sources)")
    p.add_argument("--budget-graphs", default="ring",
                   help="graphs of --budget-check (comma list)")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_reach.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the rows of earlier runs (result or .partial.json files) "
                   "into --out with their exponents and figure; runs nothing")
    p.add_argument("--one", nargs=3, metavar=("GRAPH", "N", "FUNCTION"), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def graph(name: str, n: int):
    import dicejax as dj

    if name == "torus":
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        return dj.topology.torus(rows, n // rows)
    if name == "regular4":
        return dj.topology.random_regular(n, 4, seed=0)
    return dj.topology.by_name(name, n)


def setup(graph_name: str, n: int):
    """The recorded run of the issue's setting (timed: the ``simulate`` row)."""
    import jax
    import numpy as np
    import optax

    import dicejax as dj

    ds = dj.data.load_digits()
    # every node draws its 64 samples per epoch with replacement from the whole train split
    # (the DICE reference code's mode): any n, digits has only 1,347 training images
    parts = [np.arange(BATCH)] * n
    batches = dj.data.node_batches(ds.x_train, ds.y_train, parts, STEPS, BATCH, seed=0,
                                   resample=True, samples_per_node=64)
    model = dj.models.MLP(hidden=(128, 64), num_classes=ds.num_classes)
    loss_fn = dj.models.make_loss_fn(model)
    params = dj.models.init_params(model, jax.random.PRNGKey(0), ds.input_shape, num_nodes=n)
    probe = dj.data.probe_set(ds, 128)
    topo = graph(graph_name, n)
    tic = time.perf_counter()
    traj = dj.simulate(loss_fn, params, batches, topo, optax.sgd(LR))
    jax.block_until_ready(traj.final_params)
    return loss_fn, traj, probe, time.perf_counter() - tic


def run_one(graph_name: str, n: int, fn: str, budget: float | None,
            batch_size: int | None = None) -> dict:
    import jax

    from dicejax import influence as di

    loss_fn, traj, probe, sim_seconds = setup(graph_name, n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opts = {} if budget is None else {"memory_budget": budget}
    if batch_size is not None:
        opts["batch_size"] = batch_size
    calls = {
        "dice_gt": lambda: di.gt_cascade(loss_fn, traj, probe, SOURCE_STEP, HOPS, **opts),
        "dice_e": lambda: di.e_cascade(loss_fn, traj, probe, SOURCE_STEP, HOPS, **opts),
        "dice_e2": lambda: di.e_cascade(loss_fn, traj, probe, SOURCE_STEP, HOPS, order=2,
                                        direct="exact", **opts),
        "dice_e_network": lambda: di.dice_e_network(loss_fn, traj, probe, SOURCE_STEP, HOPS),
        "proximal": lambda: di.proximal(loss_fn, traj, probe, SOURCE_STEP),
        "trajectory_attribution": lambda: di.trajectory_attribution(loss_fn, traj, probe),
    }
    row = {"graph": graph_name, "n": n, "function": fn, "load_before": load_average()}
    if fn == "simulate":
        row["seconds"] = sim_seconds
    else:
        tic = time.perf_counter()
        out = jax.block_until_ready(calls[fn]())
        row["seconds"] = time.perf_counter() - tic
        if hasattr(out, "total"):
            row["form"] = type(out).__name__
            jax.block_until_ready(out.total)
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if fn in ("dice_gt", "dice_e", "dice_e2"):
            kind = "gt" if fn == "dice_gt" else "e"
            order = 2 if fn == "dice_e2" else 1
            plan = di.cascade.plan_cascade(loss_fn, traj, probe, SOURCE_STEP, HOPS, kind=kind,
                                           order=order, **opts)
            row.update(mode=plan.mode, batch_size=plan.batch_size,
                       bytes_per_source=plan.bytes_per_source,
                       reach=None if plan.tables is None else list(plan.tables.sizes))
            if batch_size is not None:  # --budget-check: XLA's count, execution-only peak
                row.update(memory_check(loss_fn, traj, probe, plan, calls[fn], kind, order))
    row.setdefault("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row["rss_before_bytes"] = rss0
    row["load_after"] = load_average()
    return row


def _vm(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_check(loss_fn, traj, probe, plan, call, kind: str, order: int) -> dict:
    """XLA's buffer count of the chunk program the call ran, and the peak a second call adds
    (resident memory before it to its peak, the peak reset in between)."""
    import jax
    import jax.numpy as jnp

    from dicejax.influence import budget, cascade

    n = traj.num_nodes
    fn, args, static = cascade.chunk_program(
        loss_fn, traj, probe, SOURCE_STEP, HOPS, jnp.full((n,), 1.0 / n), plan, kind=kind,
        order=order, direct="exact" if order == 2 else "taylor")
    xla = budget.compiled_bytes(fn.lower(*args, batch_size=plan.batch_size,
                                         **static).compile())
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    jax.block_until_ready(call().total)
    return {"xla_bytes": xla, "exec_added_bytes": _vm("VmHWM") - before}


def sweep(args, partial: Path | None = None) -> list[dict]:
    """Every (graph, n, function) in its own subprocess; rows so far go to ``partial``."""
    rows = []
    skip = {tuple(x.split(":")) for x in args.skip.split(",") if x}
    for g in args.graphs.split(","):
        for n in (int(x) for x in args.nodes.split(",")):
            if (g, str(n)) in skip:
                continue
            for fn in args.functions.split(","):
                cmd = [sys.executable, __file__, "--one", g, str(n), fn]
                tic = time.perf_counter()
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True,
                                         timeout=args.timeout)
                    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
                    row = json.loads(line) if line.startswith("{") else {
                        "graph": g, "n": n, "function": fn,
                        "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
                except subprocess.TimeoutExpired:
                    row = {"graph": g, "n": n, "function": fn,
                           "error": f"timeout after {args.timeout:.0f} s"}
                row["wall_seconds"] = time.perf_counter() - tic
                rows.append(row)
                shown = (f"{row['seconds']:8.2f} s  {row['peak_rss_bytes'] / 2**30:6.2f} GiB"
                         if "seconds" in row else row["error"])
                print(f"{g:12s} n={n:6d} {fn:24s} {shown}  {row.get('mode', '')}", flush=True)
                if partial is not None:
                    write_json(partial, {"rows": rows})
    return rows


def exponents(rows: list[dict], lo: int = 256) -> dict:
    """Least-squares slope of log time on log n (n >= lo) per (graph, function)."""
    import numpy as np

    out = {}
    for key in sorted({(r["graph"], r["function"]) for r in rows}):
        pts = [(r["n"], r["seconds"]) for r in rows
               if (r["graph"], r["function"]) == key and "seconds" in r and r["n"] >= lo]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[f"{key[0]}/{key[1]}"] = float(np.polyfit(x, y, 1)[0])
    return out


def markdown(rows: list[dict]) -> str:
    """One table per graph: ``seconds / peak GiB`` of every function at every ``n``."""
    lines = []
    for g in sorted({r["graph"] for r in rows}, key=GRAPHS.index):
        fns = [f for f in FUNCTIONS if any(r["graph"] == g and r["function"] == f for r in rows)]
        lines += [f"**{g}**", "", "| n | " + " | ".join(f"`{f}`" for f in fns) + " | load |",
                  "|---|" + "---|" * (len(fns) + 1)]
        for n in sorted({r["n"] for r in rows if r["graph"] == g}):
            cells, loads = [], []
            for f in fns:
                hit = [r for r in rows if (r["graph"], r["n"], r["function"]) == (g, n, f)]
                if not hit:
                    cells.append("—")
                elif "seconds" in hit[0]:
                    r = hit[0]
                    cells.append(f"{r['seconds']:.1f} s, {r['peak_rss_bytes'] / 2**30:.1f} GiB")
                    loads.append(r["load_before"][0])
                else:
                    cells.append(hit[0]["error"][:40])
            load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"
            lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {load} |")
        lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    """Log-log time against ``n``, one panel per graph, one legend for every function."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    graphs = sorted({r["graph"] for r in rows}, key=GRAPHS.index)
    fig, axes = plt.subplots(1, len(graphs), figsize=(3.6 * len(graphs) + 1.0, 4.0),
                             sharey=True, squeeze=False, constrained_layout=True)
    handles = {}
    for ax, g in zip(axes[0], graphs, strict=True):
        for i, fn in enumerate(FUNCTIONS):
            pts = sorted((r["n"], r["seconds"]) for r in rows
                         if r["graph"] == g and r["function"] == fn and "seconds" in r)
            if pts:
                (handles[fn],) = ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}",
                                         label=fn)
        ns = sorted({r["n"] for r in rows if r["graph"] == g})
        ax.set(xscale="log", yscale="log", xlabel="nodes n", title=g)
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(ns[0] / 1.6, ns[-1] * 1.6)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds (first call, compilation included)")
    fig.legend([handles[f] for f in FUNCTIONS if f in handles],
               [f for f in FUNCTIONS if f in handles], loc="outside right center", fontsize=8)
    loads = [r["load_before"][0] for r in rows if "load_before" in r]
    fig.suptitle(f"DICE at scale, all sources: digits MLP, T={STEPS}, step {SOURCE_STEP}, "
                 f"hops={HOPS}, float32; 2-core CPU, load {min(loads):.1f}–{max(loads):.1f}",
                 fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def budget_check(args) -> list[dict]:
    """XLA's count and the first-guess estimate against measured memory (``--budget-nodes``
    nodes on each of ``--budget-graphs``).

    For chunks of ``k`` sources (``batch_size=k``, one subprocess each): the bytes the first
    call adds to the process's peak (``ru_maxrss`` after it minus the resident memory before
    it: compilation and execution) and a second call's (execution only), against XLA's count
    of the compiled chunk program and against ``k × source_bytes``.
    """
    rows = []
    n = args.budget_nodes
    for g in args.budget_graphs.split(","):
        for fn in ("dice_gt", "dice_e", "dice_e2"):
            for k in (n // 16, n // 4, n):
                cmd = [sys.executable, __file__, "--one", g, str(n), fn, "--batch-size", str(k)]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                first = row["peak_rss_bytes"] - row["rss_before_bytes"]
                guess = row["bytes_per_source"] * row["batch_size"]
                row.update(estimate_bytes=guess, first_added_bytes=first,
                           exec_over_xla=row["exec_added_bytes"] / row["xla_bytes"],
                           first_over_xla=first / row["xla_bytes"],
                           guess_over_exec=guess / row["exec_added_bytes"])
                rows.append(row)
                print(f"{g:8s} {fn:8s} chunk {row['batch_size']:5d}  XLA "
                      f"{row['xla_bytes'] / 2**20:7.0f} MiB  second call "
                      f"{row['exec_added_bytes'] / 2**20:7.0f} MiB "
                      f"({row['exec_over_xla']:.2f})  first call {first / 2**20:7.0f} MiB  "
                      f"first guess {guess / 2**20:7.0f} MiB", flush=True)
    return rows


def main(args) -> int:
    if args.one:
        g, n, fn = args.one
        print(json.dumps(run_one(g, int(n), fn, args.budget, args.batch_size)))
        return 0
    import jax

    jax.config.update("jax_platforms", jax.default_backend())
    result = {"machine": machine_info(), "git": git_state(),
              "setting": dict(steps=STEPS, source_step=SOURCE_STEP, hops=HOPS, batch=BATCH,
                              lr=LR, model="mlp 64-128-64-10", dataset="digits",
                              dtype="float32")}
    if args.merge:
        result["rows"] = [r for path in args.merge
                          for r in json.loads(Path(path).read_text())["rows"]]
        result["merged_from"] = [str(path) for path in args.merge]
    if args.budget_check:
        result["budget_check"] = budget_check(args)
    else:
        if not args.merge:
            partial = Path(args.out).with_suffix(".partial.json")
            result["rows"] = sweep(args, partial)
            partial.unlink(missing_ok=True)
        result["exponents_from_256"] = exponents(result["rows"])
        for key, value in result["exponents_from_256"].items():
            print(f"exponent {key:36s} {value:5.2f}")
        print(markdown(result["rows"]))
        print(f"figure {figure(result['rows'], Path(args.out).with_suffix('.png'))}")
    result["load_end"] = load_average()
    out = Path(args.out)
    if args.budget_check:
        out = out.with_name(f"{out.stem}_budget.json")
    print(f"wrote {write_json(out, result)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main(parse_args()))
