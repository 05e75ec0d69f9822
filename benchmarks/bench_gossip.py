"""Gossip alone: the dense product against the neighbour-gather kernel, per topology and size.

The measurement behind :data:`dicejax.mixing.SPARSE_MAX_FILL` (the rule by which
``mixing="auto"`` picks a kernel). For each graph it times one jitted mixing step of
MLP-sized leaves (784→128→10 by default, float32, node axis first) through
:func:`dicejax.mixing.gossip_dense` and :func:`dicejax.mixing.gossip_sparse`, checks that
the two agree, and prints the median times, their ratio and the kernel ``"auto"`` picks::

    python benchmarks/bench_gossip.py
    python benchmarks/bench_gossip.py --topologies ring,exponential --nodes 16,64 --repeats 2

Each graph is timed ``--repeats`` times: ``--calls`` calls of each kernel, interleaved
(:func:`benchmarks.common.median_ms`), their median; the table gives the fastest and
slowest of the repeats' medians. Compare within one run: the machine's speed drifts
between runs (RESULTS.md).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

import dicejax as dj
from benchmarks import common
from dicejax import mixing

DEFAULT_OUT = common.RESULTS_DIR / "bench_gossip.json"
TOPOLOGIES = ("ring", "torus", "exponential")


def make_graph(name: str, n: int) -> dj.topology.Topology | None:
    """The named graph on ``n`` nodes (:func:`dicejax.topology.by_name`); only square tori of
    side >= 3 (``None`` otherwise), so that every torus has ``D = 5``."""
    if name == "torus" and not (math.isqrt(n) ** 2 == n and n >= 9):
        return None
    return dj.topology.by_name(name, n)


def leaves(n: int, widths: list[int], rng: np.random.Generator) -> list[jax.Array]:
    """An MLP's parameters stacked over ``n`` nodes: a weight and a bias per layer."""
    out = []
    for a, b in itertools.pairwise(widths):
        out += [rng.normal(size=(n, a, b)), rng.normal(size=(n, b))]
    return [jax.numpy.asarray(x.astype(np.float32)) for x in out]


def run_case(topo: dj.topology.Topology, widths: list[int], repeats: int, calls: int,
             rng: np.random.Generator) -> dict:
    """Times both kernels on one graph; raises if they disagree."""
    n = topo.n
    matrix = jax.numpy.asarray(topo.matrix, jax.numpy.float32)
    mixer = mixing.from_topology(topo, method="sparse")
    x = leaves(n, widths, rng)
    dense = jax.jit(lambda t: mixing.gossip_dense(matrix, t))
    sparse = jax.jit(lambda t: mixing.gossip_sparse(mixer.indices, mixer.weights[0], t))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(dense(x), sparse(x), strict=True))
    if not diff <= 1e-4:
        raise RuntimeError(f"{topo.name}: dense and sparse gossip differ by {diff:.2e}")
    times = {"dense": [], "sparse": []}
    for _ in range(repeats):
        ms = common.median_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, calls)
        for kernel, value in ms.items():
            times[kernel].append(value)
    degree = int(topo.neighbors.indices.shape[1])
    return {"topology": topo.name, "n": n, "D": degree, "fill": degree / n,
            "dense_ms": times["dense"], "sparse_ms": times["sparse"],
            "dense_over_sparse": min(times["dense"]) / min(times["sparse"]),
            "auto": mixing.choose_method(n, degree), "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help=f"comma-separated, from {', '.join(TOPOLOGIES)}")
    p.add_argument("--nodes", default="8,16,24,32,36,64,128,144",
                   help="node counts (a torus takes the square ones of at least 9)")
    p.add_argument("--widths", default="784,128,10", help="the MLP's layer widths")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    names = [t for t in args.topologies.split(",") if t]
    bad = [t for t in names if t not in TOPOLOGIES]
    if bad:
        p.error(f"--topologies: unknown {', '.join(bad)} (choose from {', '.join(TOPOLOGIES)})")
    try:
        nodes = [int(v) for v in args.nodes.split(",")]
        widths = [int(v) for v in args.widths.split(",")]
    except ValueError:
        p.error("--nodes and --widths take comma-separated integers")
    if min(nodes) < 2 or len(widths) < 2 or min(widths) < 1:
        p.error("--nodes must be >= 2 and --widths needs at least two positive widths")
    if args.repeats < 1 or args.calls < 1:
        p.error("--repeats and --calls must be >= 1")

    console = Console(width=max(120, Console().width))
    result = {"benchmark": "bench_gossip", "machine": common.machine_info(),
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()},
              "sparse_max_fill": mixing.SPARSE_MAX_FILL, "rows": []}
    rng = np.random.default_rng(0)
    table = Table(title=f"gossip alone, MLP {args.widths} float32 leaves: dense product vs "
                        f"neighbour gather (ms, min–max of {args.repeats} medians)")
    for col in ("graph", "n", "D", "D / n", "dense ms", "sparse ms", "dense ÷ sparse",
                "faster", "auto picks"):
        table.add_column(col, justify="left" if col in ("graph", "faster", "auto picks")
                         else "right")
    for name in names:
        for n in nodes:
            topo = make_graph(name, n)
            if topo is None:
                continue
            row = run_case(topo, widths, args.repeats, args.calls, rng)
            result["rows"].append(row)
            faster = "dense" if row["dense_over_sparse"] < 1 else "sparse"
            table.add_row(name, str(n), str(row["D"]), f"{row['fill']:.3f}",
                          f"{min(row['dense_ms']):.3f}–{max(row['dense_ms']):.3f}",
                          f"{min(row['sparse_ms']):.3f}–{max(row['sparse_ms']):.3f}",
                          f"{row['dense_over_sparse']:.2f}", faster, row["auto"])
    result["load_average_end"] = common.load_average()
    console.print(table)
    loads = [result["machine"]["load_average"], result["load_average_end"]]
    load = " -> ".join(f"{v[0]:.1f}" if v else "?" for v in loads)
    console.print(f"auto: the gather kernel when n >= {mixing.SPARSE_MIN_NODES} and "
                  f"D <= {mixing.SPARSE_MAX_FILL:.3f} n; load average {load}")
    console.print(f"wrote {common.write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
