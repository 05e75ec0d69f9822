"""``dicejax topo-opt``: learn edge weights on a support and compare with standard graphs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
from rich import box
from rich.table import Table

from dicejax import report
from dicejax.commands import save_results
from dicejax.experiments.common import RunConfig

# (metric, header, format of mean and std); the JSON has every metric at full precision.
_COLUMNS = (("val_loss", "val loss", ".3f"), ("test_loss", "test loss", ".3f"),
            ("test_accuracy", "test acc", ".3f"), ("min_accuracy", "worst acc", ".3f"),
            ("consensus", "cons.", ".1e"))
_SHORT = {"metropolis_hastings": "MH", "ring_lattice": "ring lattice"}


def register(subparsers: argparse._SubParsersAction,
             run_args: Callable[..., None],
             make_config: Callable[[argparse.Namespace], RunConfig]) -> None:
    """Adds ``dicejax topo-opt`` to the CLI's sub-parsers.

    Args:
      subparsers: the parser's ``add_subparsers()`` object.
      run_args: adds the shared run options (``run_args(parser, steps=...)``).
      make_config: builds a :class:`RunConfig` from the parsed options.
    """
    from dicejax.experiments.topology_opt import BASELINES, PARAMETERIZATIONS
    from dicejax.topology_opt import OBJECTIVES

    p = subparsers.add_parser(
        "topo-opt", help="learn edge weights on a support; compare with ring, exponential, MH",
        description="Optimise the mixing weights on the support given by --topology (default "
                    "a random 4-regular graph) with Adam, on a validation slice of the train "
                    "split, then train every topology on the same batches and evaluate on "
                    "the test split, over several seeds.")
    run_args(p, steps=300)
    p.set_defaults(topology="random_regular", eval_every=10)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="probe_loss",
                   help="minimised: final validation loss, final consensus distance, "
                        "1 − spectral gap, or the spread of nodes' contributions (fairness)")
    p.add_argument("--parameterization", choices=PARAMETERIZATIONS, default="sinkhorn")
    p.add_argument("--opt-steps", type=int, default=30, help="Adam steps on the edge logits")
    p.add_argument("--opt-lr", type=float, default=0.05, help="Adam step size on the logits")
    p.add_argument("--horizon", type=int, default=None,
                   help="training steps unrolled by the objective (default --steps)")
    p.add_argument("--val-size", type=int, default=128,
                   help="validation examples cut from the train split for the objective")
    p.add_argument("--max-degree", type=int, default=None, help="hard in-degree budget")
    p.add_argument("--entropy-weight", type=float, default=0.0, help="soft degree budget")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated subset of {','.join(BASELINES)}")
    p.set_defaults(fn=lambda a: run(a, make_config))


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], RunConfig]) -> int:
    """The command's handler: compare, print the table, save JSON and figures."""
    from dicejax.experiments.topology_opt import compare

    config = make_config(a)
    out = Path(a.out)
    baselines = tuple(b for b in a.baselines.split(",") if b)
    with report.console.status("optimising the graph ...") as status:
        result = compare(config, seeds=a.seeds, opt_steps=a.opt_steps,
                         objective=a.objective, parameterization=a.parameterization,
                         opt_lr=a.opt_lr, horizon=a.horizon, val_size=a.val_size,
                         baselines=baselines, max_degree=a.max_degree,
                         entropy_weight=a.entropy_weight, callback=status.update)
    report.console.print(table(result))
    report.console.print(
        f"support {result['support']['name']} (degree {result['support']['degree']:g}); "
        f"objective {result['objective']} ({result['parameterization']}, "
        f"{result['opt_steps']} Adam steps); {len(result['seeds'])} seeds in "
        f"{result['wall_seconds']:.1f} s")
    save_results(out, "topo_opt", result, {"topo_opt_graph.png": graph_figure,
                                           "topo_opt_curves.png": curves_figure})
    return 0


def table(result: dict) -> Table:
    """Mean ± std over seeds of the held-out metrics, one row per topology."""
    t = Table(title=f"Learned vs standard graphs ({len(result['seeds'])} seeds, mean, ±std)",
              box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
              caption="gap: 1 − |λ₂(W)|; val: the objective's validation slice; test: held "
                      "out; cons.: consensus distance (1/n) Σ_k ||θ_k − θ̄||²")
    t.add_column("topology", no_wrap=True)
    t.add_column("deg", justify="right")
    t.add_column("gap", justify="right")
    for _, label, _ in _COLUMNS:
        t.add_column(label, justify="right")
    for name, row in result["topologies"].items():
        cells = [f"{row[key]['mean']:{f}}\n[dim]±{row[key]['std']:{f}}[/dim]"
                 for key, _, f in _COLUMNS]
        t.add_row(_SHORT.get(name, name), f"{row['degree']:g}",
                  f"{row['spectral_gap']['mean']:.3f}", *cells)
    return t


def graph_figure(result: dict, path: Path) -> Path:
    """The first seed's learned ``W``: heat map and drawing (edge width ∝ weight)."""
    w = np.asarray(result["learned"]["weights"][0])
    if w.ndim == 3:
        w = w.mean(axis=0)
    n = w.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    im = axes[0].imshow(w, cmap="viridis", vmin=0)
    axes[0].set(title="learned W (row k: weights node k receives)", xlabel="sender j",
                ylabel="receiver k")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    edges = [(j, k, w[k, j]) for k in range(n) for j in range(n) if k != j and w[k, j] > 0]
    graph.add_weighted_edges_from(edges)
    pos = nx.circular_layout(graph)
    scale = 6.0 / max(float(w[~np.eye(n, dtype=bool)].max()), 1e-12)
    nx.draw_networkx_nodes(graph, pos, ax=axes[1], node_size=220,
                           node_color=np.diag(w), cmap="Oranges", edgecolors="k")
    nx.draw_networkx_labels(graph, pos, ax=axes[1], font_size=7)
    nx.draw_networkx_edges(graph, pos, ax=axes[1], width=[scale * e[2] for e in edges],
                           arrows=True, arrowsize=6, alpha=0.7, connectionstyle="arc3,rad=0.1")
    axes[1].set(title="learned graph (width ∝ weight, colour = self-weight)")
    axes[1].axis("off")
    return report.save_figure(fig, path)


def curves_figure(result: dict, path: Path) -> Path:
    """Mean train and test loss per topology (mean over nodes and seeds), and the objective."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, row in result["topologies"].items():
        c = row["curves"]
        axes[0].plot(np.asarray(c["train_loss"]), label=name, lw=1)
        axes[1].plot(np.asarray(c["eval_step"]), np.asarray(c["test_loss"]), label=name,
                     marker=".")
    axes[0].set(xlabel="step", ylabel="mean train loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="mean test loss", yscale="log")
    axes[1].legend(fontsize=8)
    for i, h in enumerate(result["learned"]["history"]):
        axes[2].plot(np.asarray(h), label=f"seed {result['seeds'][i]}")
    axes[2].set(xlabel="Adam step on the edge logits", ylabel=f"objective ({result['objective']})")
    axes[2].legend(fontsize=8)
    return report.save_figure(fig, path)
