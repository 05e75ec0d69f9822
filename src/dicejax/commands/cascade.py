"""``dicejax cascade``: the paper's Figure 1 — one batch placed at each node of the designed
16-node matrix; Spearman between out-going weight and influence magnitude."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from rich.table import Table

from dicejax import report
from dicejax import topology as topo_lib
from dicejax.commands import save_results
from dicejax.experiments.common import RunConfig


def register(subparsers, run_args: Callable[[argparse.ArgumentParser], None],
             make_config: Callable[[argparse.Namespace], RunConfig]) -> None:
    """Adds ``dicejax cascade`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "cascade", help="Figure 1: the same batch at each node of the designed 16-node matrix")
    run_args(p)
    p.add_argument("--matrix", default=None,
                   help="CSV of a 16-node mixing matrix to use instead of the paper's designed "
                        "one (default: the copy bundled with dicejax, or $DICEJAX_DESIGNED16); "
                        "replaces --topology and --nodes")
    p.add_argument("--hops", type=int, default=3, help="cascade hops r")
    p.add_argument("--placements", type=int, default=8,
                   help="placement steps averaged (the last hops * placements steps)")
    p.set_defaults(fn=lambda a: _run(a, make_config))


def _run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], RunConfig]) -> int:
    from dicejax.experiments.cascade import cascade_experiment

    config = make_config(a)
    out = Path(a.out)
    with report.console.status("training and scoring cascades ..."):
        result = cascade_experiment(config, a.matrix, hops=a.hops, placements=a.placements)
    report.console.print(cascade_table(result))
    hop = ", ".join(f"{s:.3f}" for s in result["spearman_per_hop"])
    amp = ", ".join(f"{s:.3f}" for s in result["spearman_amplification"])
    report.console.print(
        f"Spearman(out-weight, |network influence| / |direct|) per hop 1..r: {amp}")
    report.console.print(
        f"Spearman(out-weight, |network influence|): {result['spearman']:.4f} at hop "
        f"{result['hops']} (GT), {result['spearman_e']:.4f} (DICE-E); per hop 1..r: {hop}; "
        f"mean test accuracy {result['mean_accuracy']:.4f}; {result['wall_seconds']:.1f} s")
    return save_results(out, "cascade", result, {
        "cascade.png": lambda r, path: cascade_figure(r, a.matrix, path)})


def cascade_table(result: dict) -> Table:
    """One row per source node: out-weight, mean |network influence| per hop, GT vs E."""
    r = result["hops"]
    table = Table(title=f"Same batch at each node (designed16), {len(result['placement_steps'])}"
                        f" placements, r = {r}")
    for name in ("node", "out-weight", *[f"|net| h={h}" for h in range(1, r + 1)],
                 "GT total", "E total"):
        table.add_column(name, justify="right")
    per_hop = np.asarray(result["magnitude_per_hop"])
    gt_total = np.asarray(result["gt"]["total"]).mean(axis=0)
    e_total = np.asarray(result["e"]["total"]).mean(axis=0)
    for j, w in enumerate(result["out_weight"]):
        table.add_row(str(j), f"{w:.2f}", *[f"{per_hop[h, j]:.3e}" for h in range(r)],
                      f"{gt_total[j]:.3e}", f"{e_total[j]:.3e}")
    table.caption = ("|net| h: mean over placements of |Σ_k q_k ΔL_k(t+h)| (exact); totals: "
                     "mean r-hop DICE score (negative = helpful)")
    return table


def cascade_figure(result: dict, matrix_path: str, path: Path) -> Path:
    """The graph with node size = influence magnitude; out-weight vs amplification."""
    topo = topo_lib.designed16(matrix_path)
    graph = topo_lib.to_networkx(topo)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    mag = np.asarray(result["magnitude"], np.float64)
    w = np.asarray(result["out_weight"], np.float64)
    fig, (gx, sx) = plt.subplots(1, 2, figsize=(12.5, 4.8), gridspec_kw={"wspace": 0.35})
    pos = nx.spring_layout(graph, seed=0)
    sizes = 100 + 1400 * mag / max(mag.max(), 1e-30)
    nx.draw_networkx_edges(graph, pos, ax=gx, alpha=0.4, arrows=True, arrowsize=8)
    nodes = nx.draw_networkx_nodes(graph, pos, ax=gx, node_size=sizes, node_color=w,
                                   cmap="viridis")
    nx.draw_networkx_labels(graph, pos, ax=gx, font_size=7, font_color="w")
    fig.colorbar(nodes, ax=gx, label="out-going weight Σ_k W[k, j]", fraction=0.04, pad=0.01)
    gx.set(title=f"node size = |influence| of the batch placed there (hop {result['hops']})")
    gx.axis("off")
    amp = np.asarray(result["amplification"], np.float64)[-1]
    sx.scatter(w, amp)
    for j in range(w.size):
        sx.annotate(str(j), (w[j], amp[j]), fontsize=7)
    sx.set(xlabel="out-going weight", ylabel="median |network influence| / |direct|",
           title=f"amplification at hop {result['hops']}: Spearman "
                 f"{result['spearman_amplification'][-1]:.3f} (raw |influence|: "
                 f"{result['spearman']:.3f})")
    return report.save_figure(fig, path)
