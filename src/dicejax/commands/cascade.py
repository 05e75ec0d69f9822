"""``dicejax cascade``: the paper's Figure 1 — one batch placed at each node of the designed
16-node matrix; Spearman between out-going weight and influence magnitude."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from dicejax.commands import add_command, metadata, options, prepare, save_results


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax cascade`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "cascade",
        help="Figure 1: the same batch at each node of the designed 16-node matrix",
        description="Train on the DICE paper's designed 16-node matrix; at --placements steps "
                    "give every node the same batch and measure, exactly (DICE-GT) and with "
                    "DICE-E, how much that batch placed at node j changes all nodes' probe "
                    "loss h = 1..r steps later. Reports Spearman between out-going weight and "
                    "that influence. Writes cascade.json and cascade.png.")
    run_args(p)
    g = p.add_argument_group("cascade")
    g.add_argument("--matrix", default=None, metavar="CSV",
                   help="CSV file of another 16-node mixing matrix (a path relative to the "
                        "current folder); default: the paper's designed matrix bundled with "
                        "dicejax (or $DICEJAX_DESIGNED16 when set). Replaces --topology and "
                        "--nodes")
    g.add_argument("--hops", type=options.positive_int, default=3, metavar="R",
                   help="cascade hops r: influence is measured at h = 1..r steps after the "
                        "placement")
    g.add_argument("--placements", type=options.positive_int, default=8, metavar="P",
                   help="placement steps averaged: the last R x P steps of the run")
    p.set_defaults(fn=lambda a: run(a, make_config), nodes=16)


def check(a: argparse.Namespace) -> None:
    """``--hops x --placements <= --steps``; ``--matrix`` exists (resolved to a full path)."""
    if a.hops * a.placements > a.steps:
        raise options.UsageError(
            f"--placements: --hops {a.hops} x --placements {a.placements} = "
            f"{a.hops * a.placements} exceeds --steps {a.steps}")
    if a.matrix is not None:
        path = Path(a.matrix).expanduser()
        if not path.is_file():
            raise options.UsageError(
                f"--matrix: no such file {a.matrix!r} (relative paths start in "
                f"{os.getcwd()}); omit --matrix to use the paper's designed matrix bundled "
                "with dicejax")
        a.matrix = str(path.resolve())


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a, [check])
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.cascade import cascade_experiment

    with Tracker(report.console) as t:
        bars = {"train": t.bar("training", config.steps, "steps"),
                "score": t.bar("cascades", a.placements, "placements", noun="placement")}
        result = cascade_experiment(
            config, a.matrix, hops=a.hops, placements=a.placements,
            progress=lambda phase, done, total: t.update(bars[phase], done))
    result["matrix_path"] = a.matrix
    report.console.print(cascade_table(result))
    hop = ", ".join(f"{s:.3f}" for s in result["spearman_per_hop"])
    amp = ", ".join(f"{s:.3f}" for s in result["spearman_amplification"])
    report.console.print(
        f"Spearman(out-weight, amplification |network influence| / |direct|) at h = 1..r: {amp}")
    report.console.print(
        f"Spearman(out-weight, |network influence|) at h = 1..r (DICE-GT): {hop}; at h = r with "
        f"DICE-E: {result['spearman_e']:.4f}; mean test accuracy "
        f"{result['mean_accuracy']:.4f}; {result['wall_seconds']:.1f} s")
    return save_results(out, "cascade", result, {
        "cascade.png": lambda r, path: cascade_figure(r, a.matrix, path)}, metadata(a))


def cascade_table(result: dict) -> object:
    """One row per source node: out-weight, mean |network influence| per hop, GT vs E."""
    import numpy as np

    from dicejax import report

    r = result["hops"]
    m = len(result["placement_steps"])
    name = Path(str(result.get("matrix_path") or "designed16")).stem
    t = report.table(
        f"Same batch placed at each node ({name}), {m} placement{'s' if m != 1 else ''}, "
        f"r = {r} — {report.config_line(result.get('config'), skip=('topology', 'nodes'))}",
        caption="out-weight: Σ_k W[k, j], the weight node j's model carries into the next "
                "step. |net| h: mean over placements of |Σ_k q_k ΔL_k(t + h)|, the exact "
                "(DICE-GT) change of all nodes' weighted probe loss h steps after the batch "
                "was placed at j (nats). amplification: median over placements of |net| r / "
                "|direct|. DICE-GT total, DICE-E total: mean over placements of the r-hop "
                "score (direct term + shells 1..r; DICE-E: the paper's first-order "
                "estimator), nats, negative = helpful.")
    cols = ["node", "out-weight", *[f"|net| h={h} (nats)" for h in range(1, r + 1)],
            "amplification", "DICE-GT total", "DICE-E (E1) total"]
    for c in cols:
        t.add_column(c, justify="right")
    per_hop = np.asarray(result["magnitude_per_hop"], np.float64)
    amp = np.asarray(result["amplification"], np.float64)[-1]
    gt_total = np.asarray(result["gt"]["total"], np.float64).mean(axis=0)
    e_total = np.asarray(result["e"]["total"], np.float64).mean(axis=0)
    for j, w in enumerate(result["out_weight"]):
        t.add_row(str(j), f"{w:.2f}", *[f"{per_hop[h, j]:.3e}" for h in range(r)],
                  f"{amp[j]:.2f}", f"{gt_total[j]:.3e}", f"{e_total[j]:.3e}")
    return t


def _place_labels(ax, x, y, labels) -> None:
    """Labels beside scatter points without overlaps (greedy, in axes fractions)."""
    import numpy as np

    ax.figure.canvas.draw()
    to_axes = ax.transData + ax.transAxes.inverted()
    pts = to_axes.transform(np.column_stack([x, y]))
    w, h = 0.035, 0.05
    placed: list[tuple[float, float]] = []
    offsets = [(0.012, -h / 2), (-0.012 - w, -h / 2), (0.012, 0.01), (0.012, -h - 0.01),
               (-0.012 - w, 0.01), (-0.012 - w, -h - 0.01), (0.03, 0.05), (0.03, -0.1),
               (-0.03 - w, 0.05), (-0.03 - w, -0.1), (0.05, 0.1), (0.05, -0.15),
               (-0.05 - w, 0.1), (-0.05 - w, -0.15)]

    def free(bx, by):
        if bx < 0 or by < 0 or bx + w > 1 or by + h > 1:
            return False
        for px, py in placed:
            if abs(px - bx) < w and abs(py - by) < h:
                return False
        return all(not (bx - 0.008 < qx < bx + w + 0.008 and by - 0.008 < qy < by + h + 0.008)
                   for qx, qy in pts)

    for i in np.argsort(-pts[:, 1]):
        px, py = pts[i]
        for k, (dx, dy) in enumerate(offsets):
            bx, by = px + dx, py + dy
            if free(bx, by) or k == len(offsets) - 1:
                break
        placed.append((bx, by))
        far = abs(dx) > 0.02 or dy > 0.02 or dy < -h - 0.02
        ax.annotate(labels[i], (x[i], y[i]), xytext=(bx + w / 2, by + h / 2),
                    textcoords="axes fraction", ha="center", va="center", fontsize=7,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if far else None)


def cascade_figure(result: dict, matrix_path: str | None, path: Path) -> Path:
    """The graph with node size = influence magnitude; out-weight vs amplification."""
    import networkx as nx
    import numpy as np

    from dicejax import report
    from dicejax import topology as topo_lib

    topo = topo_lib.designed16(matrix_path)
    graph = topo_lib.to_networkx(topo)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    mag = np.asarray(result["magnitude"], np.float64)
    w = np.asarray(result["out_weight"], np.float64)
    r = result["hops"]
    m = len(result["placement_steps"])
    title = (f"dicejax cascade — the same batch placed at each node of {topo.name}, "
             f"{m} placements, h = {r} steps later\n"
             f"{report.config_line(result.get('config'), skip=('topology', 'nodes'))}")
    fig, axes = report.figure(1, 2, 13, 5.6, title)
    gx, sx = axes[0]
    pos = nx.kamada_kawai_layout(graph)
    top = max(mag.max(), 1e-30)
    size = lambda v: 160 + 900 * np.asarray(v) / top  # noqa: E731
    nx.draw_networkx_edges(graph, pos, ax=gx, alpha=0.3, arrows=True, arrowsize=7,
                           node_size=size(mag), connectionstyle="arc3,rad=0.08")
    nodes = nx.draw_networkx_nodes(graph, pos, ax=gx, node_size=size(mag), node_color=w,
                                   cmap="viridis", edgecolors="k", linewidths=0.5)
    rgba = nodes.cmap(nodes.norm(w))
    light = rgba[:, :3] @ np.array([0.299, 0.587, 0.114]) > 0.55  # dark text on light nodes
    for j in range(w.size):
        gx.text(*pos[j], str(j), ha="center", va="center", fontsize=7,
                color="k" if light[j] else "w")
    fig.colorbar(nodes, ax=gx, label="out-going weight Σ_k W[k, j]", shrink=0.8)
    for v in (top / 4, top / 2, top):
        gx.scatter([], [], s=size(v), color="0.7", edgecolors="k", linewidths=0.5,
                   label=f"{v:.1e}")
    gx.legend(title=f"node size: |network influence| at h = {r} (nats, DICE-GT)", fontsize=7,
              title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3,
              labelspacing=1.5, columnspacing=3.0, handletextpad=2.4, borderpad=1.8,
              frameon=False)
    gx.set(title="node size: influence of the batch placed there")
    gx.axis("off")
    amp = np.asarray(result["amplification"], np.float64)[-1]
    sx.scatter(w, amp, c=w, cmap="viridis", edgecolors="k", linewidths=0.5, s=36, zorder=3)
    sx.set(xlabel="out-going weight Σ_k W[k, j]",
           ylabel=f"amplification: median |network influence at h = {r}| / |direct|",
           title=f"amplification vs out-weight: Spearman "
                 f"{result['spearman_amplification'][-1]:.3f}\n(raw |network influence| vs "
                 f"out-weight: {result['spearman']:.3f})")
    finite = amp[np.isfinite(amp) & (amp > 0)]
    if finite.size and finite.max() / finite.min() > 20:
        sx.set_yscale("log")
        sx.set_ylabel(sx.get_ylabel() + " (log scale)")
    sx.margins(0.12)
    _place_labels(sx, w, amp, [str(j) for j in range(w.size)])
    return report.save_figure(fig, path)
