"""``dicejax topo-opt``: learn edge weights on a support and compare with standard graphs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dicejax.commands import add_command, metadata, options, prepare, save_results

# (metric, header, format of mean and std); the JSON has every metric at full precision.
_COLUMNS = (("val_loss", "val loss", ".4f"), ("test_loss", "test loss", ".4f"),
            ("test_accuracy", "test acc", ".4f"), ("min_accuracy", "worst node acc", ".4f"),
            ("consensus", "consensus dist.", ".2e"))
_SHORT = {"metropolis_hastings": "Metropolis–Hastings", "ring_lattice": "ring lattice",
          "learned": "learned", "uniform": "uniform"}


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax topo-opt`` to the CLI's sub-parsers.

    Args:
      subparsers: the parser's ``add_subparsers()`` object.
      run_args: adds the shared run options (``run_args(parser, steps=...)``).
      make_config: builds a ``RunConfig`` from the parsed options.
    """
    p = add_command(
        subparsers, "topo-opt",
        help="learn edge weights on a support; compare with ring, exponential, MH",
        description="Optimise the mixing weights on the support given by --topology (default "
                    "a random 4-regular graph) with Adam, on a validation slice of the train "
                    "split, then train every topology on the same batches and evaluate on "
                    "the test split, over several seeds. Writes topo_opt.json, "
                    "topo_opt_graph.png and topo_opt_curves.png.")
    out = run_args(p, steps=300)
    options.add_checkpoint_arg(out if out is not None else p, "every finished seed")
    p.set_defaults(topology="random_regular", eval_every=10)
    g = p.add_argument_group("topology optimisation")
    g.add_argument("--seeds", type=options.positive_int, default=3, metavar="K",
                   help="number of seeds (--seed, --seed + 1, ...)")
    g.add_argument("--objective", choices=options.OBJECTIVES, default="probe_loss",
                   help="minimised: final validation loss (probe_loss), final consensus "
                        "distance, 1 − spectral gap, or the spread of nodes' contributions "
                        "(fairness)")
    g.add_argument("--parameterization", choices=options.PARAMETERIZATIONS, default="sinkhorn",
                   help="sinkhorn: doubly stochastic weights; row_softmax: row-stochastic")
    g.add_argument("--opt-steps", type=options.non_negative_int, default=30, metavar="S",
                   help="Adam steps on the edge logits")
    g.add_argument("--opt-lr", type=options.positive_float, default=0.05, metavar="LR",
                   help="Adam step size on the edge logits")
    g.add_argument("--horizon", type=options.positive_int, default=None, metavar="H",
                   help="training steps unrolled by the objective (default: --steps)")
    g.add_argument("--val-size", type=options.positive_int, default=128, metavar="V",
                   help="validation examples cut from the train split for the objective")
    g.add_argument("--max-degree", type=options.positive_int, default=None, metavar="K",
                   help="hard in-degree budget of the learned graph (default: the support's)")
    g.add_argument("--entropy-weight", type=options.non_negative_float, default=0.0,
                   metavar="λ", help="soft degree budget (row-entropy penalty weight)")
    g.add_argument("--baselines", type=options.name_list(options.BASELINES),
                   default=list(options.BASELINES), metavar="A,B,...",
                   help=f"comma-separated subset of {','.join(options.BASELINES)} "
                        "(default: all)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """``--max-degree < --nodes``."""
    if isinstance(a.baselines, str):  # a caller's string default
        a.baselines = options.name_list(options.BASELINES)(a.baselines)
    if a.max_degree is not None and a.max_degree >= a.nodes:
        raise options.UsageError(f"--max-degree: {a.max_degree} must be below --nodes "
                                 f"{a.nodes}")


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler: compare, print the table, save JSON and figures."""
    out = prepare(a, [check])
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.topology_opt import compare

    baselines = tuple(a.baselines)
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        seed_bar = t.bar("seeds", a.seeds, "seeds", noun="seed", ordinal=True)
        opt_bar = t.bar("optimising the graph", a.opt_steps, "Adam steps", noun="Adam step")
        train_bar = t.bar("training the topologies", len(baselines) + 1, "topologies",
                          noun="topology")
        current = [0]

        def on_progress(i, phase, done, total):
            if i != current[0]:
                current[0] = i
                t.reset(opt_bar)
                t.reset(train_bar)
            if phase == "optimise":
                t.update(opt_bar, done, info=f"seed {config.seed + i}")
            else:
                if done == 1:
                    t.reset(train_bar, total=total)
                t.update(train_bar, done, info=f"seed {config.seed + i}")
                if done == total:
                    t.update(seed_bar, i + 1)

        result = compare(config, seeds=a.seeds, opt_steps=a.opt_steps,
                         objective=a.objective, parameterization=a.parameterization,
                         opt_lr=a.opt_lr, horizon=a.horizon, val_size=a.val_size,
                         baselines=baselines, max_degree=a.max_degree,
                         entropy_weight=a.entropy_weight, progress=on_progress,
                         checkpoint_dir=a.checkpoint_dir)
    report.console.print(table(result))
    report.console.print(
        f"support {result['support']['name']} (degree {result['support']['degree']:g}); "
        f"objective {result['objective']} ({result['parameterization']}, "
        f"{result['opt_steps']} Adam steps); {report.seeds_text(result['seeds'])} in "
        f"{result['wall_seconds']:.1f} s")
    return save_results(out, "topo_opt", result, {"topo_opt_graph.png": graph_figure,
                                                  "topo_opt_curves.png": curves_figure},
                        metadata(a))


def _label(name: str, row: dict, rows: dict) -> str:
    """``"uniform = Metropolis–Hastings"`` for a row whose twin is listed under it."""
    twins = [_SHORT.get(other, other) for other, r in rows.items()
             if r.get("same_as") == name]
    return " = ".join([_SHORT.get(name, name), *twins])


def table(result: dict) -> object:
    """Mean ± std over seeds of the held-out metrics, one row per distinct topology."""
    from dicejax import report

    seeds = result["seeds"]
    n = len(seeds)
    rows = result["topologies"]
    t = report.table(
        f"Learned vs standard graphs, {report.seeds_text(seeds)}"
        + (" (mean ± std)" if n > 1 else "") + " — "
        + report.config_line(result.get("config"), seeds=seeds, skip=("topology",)),
        caption="deg: mean in-degree without self-loops; gap: spectral gap 1 − |λ₂(W)|; val "
                "loss: the objective's validation slice of the train split; test loss (nats), "
                "test acc: mean over nodes on the held-out test split; worst node acc: the "
                "lowest node accuracy; consensus dist.: (1/n) Σ_k ||θ_k − θ̄||² after the run. "
                "Topologies with identical weights on this support share one row (A = B).")
    t.add_column("topology", no_wrap=True)
    t.add_column("deg", justify="right")
    t.add_column("gap", justify="right")
    for _, label, _ in _COLUMNS:
        t.add_column(label, justify="right")
    for name, row in rows.items():
        if row.get("same_as"):
            continue
        cells = [report.mean_std(row[key], n, f) for key, _, f in _COLUMNS]
        t.add_row(_label(name, row, rows), f"{row['degree']:g}",
                  report.mean_std(row["spectral_gap"], n, ".3f"), *cells)
    return t


def graph_figure(result: dict, path: Path) -> Path:
    """The first seed's learned ``W``: heat map and drawing (edge width ∝ weight)."""
    import networkx as nx
    import numpy as np
    from matplotlib import cm, colors

    from dicejax import report

    w = np.asarray(result["learned"]["weights"][0], np.float64)
    if w.ndim == 3:
        w = w.mean(axis=0)
    n = w.shape[0]
    seeds = result["seeds"]
    title = (f"dicejax topo-opt — learned weights ({result['parameterization']}, objective "
             f"{result['objective']}, {result['opt_steps']} Adam steps) on the support "
             f"{result['support']['name']}, seed {seeds[0]}\n"
             + report.config_line(result.get("config"), seeds=seeds[:1], skip=("topology",)))
    fig, axes = report.figure(1, 2, 12, 5.4, title)
    hx, gx = axes[0]
    im = hx.imshow(w, cmap="viridis", vmin=0)
    hx.set(title="learned W (row k: the weights node k receives)", xlabel="sender j",
           ylabel="receiver k")
    fig.colorbar(im, ax=hx, label="weight W[k, j]", shrink=0.85)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    edges = [(j, k, w[k, j]) for k in range(n) for j in range(n) if k != j and w[k, j] > 0]
    graph.add_weighted_edges_from(edges)
    pos = nx.circular_layout(graph)
    off = w[~np.eye(n, dtype=bool)]
    scale = 3.0 / max(float(off.max()) if off.size else 1.0, 1e-12)
    self_w = np.diag(w)
    norm = colors.Normalize(vmin=float(self_w.min()), vmax=float(max(self_w.max(),
                                                                     self_w.min() + 1e-9)))
    nx.draw_networkx_nodes(graph, pos, ax=gx, node_size=260, node_color=self_w, cmap="Oranges",
                           vmin=norm.vmin, vmax=norm.vmax, edgecolors="k", linewidths=0.6)
    nx.draw_networkx_labels(graph, pos, ax=gx, font_size=7)
    nx.draw_networkx_edges(graph, pos, ax=gx, width=[scale * e[2] for e in edges],
                           arrows=True, arrowsize=7, alpha=0.6, node_size=260,
                           connectionstyle="arc3,rad=0.1")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="Oranges"), ax=gx,
                 label="self-weight W[k, k]", shrink=0.85)
    gx.set(title="learned graph (edge width ∝ weight)")
    gx.axis("off")
    return report.save_figure(fig, path)


def curves_figure(result: dict, path: Path) -> Path:
    """Mean train and test loss per topology (mean over nodes and seeds), and the objective."""
    import numpy as np

    from dicejax import report

    seeds = result["seeds"]
    title = (f"dicejax topo-opt — support {result['support']['name']}, "
             f"{report.seeds_text(seeds)}\n"
             + report.config_line(result.get("config"), seeds=seeds, skip=("topology",)))
    fig, axes = report.figure(1, 3, 15.5, 4.6, title)
    tx, vx, ox = axes[0]
    rows = result["topologies"]
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]
    shown = [(name, row) for name, row in rows.items() if not row.get("same_as")]
    base = rows.get("uniform")  # the learned graph's starting point: differences are readable
    ref = None if base is None else np.asarray(base["curves"]["test_loss"], np.float64)
    for i, (name, row) in enumerate(shown):
        c = row["curves"]
        label = _label(name, row, rows)
        train = np.asarray(c["train_loss"], np.float64)
        tx.plot(np.arange(train.size), train, label=label, lw=1.2, color=f"C{i}",
                ls=styles[i % len(styles)])
        test = np.asarray(c["test_loss"], np.float64)
        vx.plot(np.asarray(c["eval_step"]), test if ref is None else test - ref, label=label,
                marker=".", color=f"C{i}", ls=styles[i % len(styles)])
    tx.set(xlabel="step", ylabel="train loss (nats, mean over nodes and seeds)", yscale="log",
           title="train loss")
    if ref is None:
        vx.set(xlabel="step", ylabel="test loss (nats, mean over nodes and seeds)",
               yscale="log", title="held-out test loss")
    else:
        vx.axhline(0, color="k", lw=0.6)
        vx.set(xlabel="step", ylabel="test loss − uniform's (nats, mean over nodes and seeds)",
               title="held-out test loss, relative to uniform weights")
    vx.legend(fontsize=8)
    for i, h in enumerate(result["learned"]["history"]):
        ox.plot(np.arange(1, len(h) + 1), np.asarray(h, np.float64),
                label=f"seed {seeds[i]}", marker=".")
    unit = {"probe_loss": " (validation loss, nats)", "consensus": " (consensus distance)",
            "spectral_gap": " (1 − spectral gap)", "fairness": ""}.get(result["objective"], "")
    ox.set(xlabel="Adam step on the edge logits", ylabel=f"objective{unit}",
           title=f"objective: {result['objective']}")
    if result["learned"]["history"] and len(result["learned"]["history"][0]):
        ox.legend(fontsize=8)
    return report.save_figure(fig, path)
