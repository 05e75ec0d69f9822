"""Figures and terminal tables for experiment results (matplotlib and rich; no core logic).

One table style for every command (:func:`table`): a title that states the setting, a
caption that explains every column and its unit, mean ± std over seeds only where there is
more than one seed (:func:`mean_std`). Figures (:func:`figure`) carry the run's configuration
in their title (:func:`config_line`), use constrained layout (no overlapping labels) and are
written atomically (:func:`save_figure`).

Units: losses are mean cross-entropies in nats; influence scores are changes of the
(node-weighted) probe loss in nats, negative = the data helped.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich import box
from rich.table import Table

from dicejax.commands.console import console, err_console

__all__ = ["ESTIMATOR_FILES", "ESTIMATOR_TEXT", "accuracy_table", "alignment_figure",
           "alignment_table", "config_dict", "config_line", "console", "err_console", "figure",
           "mean_std", "save_figure", "seeds_text", "table", "training_figure"]


# --------------------------------------------------------------------------------------------
# Common pieces
# --------------------------------------------------------------------------------------------


def config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def config_line(config: Any, *, seeds: Sequence[int] | None = None, topology: str | None = None,
                skip: Sequence[str] = ()) -> str:
    """One line naming a run: data, nodes, graph, model, optimizer, lr, batch, steps, seed(s).

    Args:
      config: a ``RunConfig`` or its dict.
      seeds: the seeds of a multi-seed experiment (default: the config's seed).
      topology: the graph's name to print instead of ``config.topology``.
      skip: keys to leave out (e.g. ``("topology",)`` when the title names it).
    """
    c = config_dict(config)
    if not c:
        return ""
    parts = [str(c.get("dataset", "")).replace("npz:", "")]
    if "nodes" not in skip:
        parts.append(f"{c.get('nodes')} nodes")
    if "topology" not in skip:
        parts.append(Path(str(topology or c.get("topology"))).name)
    parts.append(str(c.get("model", "")).rsplit(":", 1)[-1])
    parts.append(f"{c.get('optimizer')} lr {c.get('lr'):g}")
    parts.append(f"batch {c.get('batch')}")
    if "steps" not in skip:
        parts.append(f"{c.get('steps')} steps")
    if seeds is not None and len(seeds) > 1:
        parts.append(f"seeds {seeds[0]}–{seeds[-1]}")
    elif seeds is not None and len(seeds) == 1:
        parts.append(f"seed {seeds[0]}")
    else:
        parts.append(f"seed {c.get('seed')}")
    return ", ".join(p for p in parts if p)


def table(title: str, caption: str | None = None) -> Table:
    """An empty table in the style every command uses."""
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
                 caption_justify="left", padding=(0, 1), pad_edge=False)


def mean_std(stat: Mapping[str, Any], count: int, fmt: str = ".4f") -> str:
    """``"m ± s"`` over ``count`` seeds, or just ``"m"`` for a single seed."""
    mean = stat["mean"]
    if mean is None:
        return "—"
    if count <= 1 or stat.get("std") is None:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {stat['std']:{fmt}}"


def seeds_text(seeds: Sequence[int]) -> str:
    """``"seed 0"`` or ``"3 seeds"``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds"


def figure(rows: int, cols: int, width: float, height: float, title: str | None = None,
           **kwargs: Any):
    """``plt.subplots`` with constrained layout and a figure title."""
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), layout="constrained",
                             squeeze=False, **kwargs)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    """Saves a matplotlib figure atomically (temporary file, then rename) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def accuracy_table(summary: dict) -> Table:
    """Per-node final test accuracy and loss."""
    c = config_dict(summary.get("config"))
    t = table(f"Per-node test accuracy after {c.get('steps', '?')} steps "
              f"({summary['topology']['name']})",
              caption="accuracy: fraction of the test examples classified correctly; loss: "
                      "mean test cross-entropy in nats")
    t.add_column("node", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_column("loss (nats)", justify="right")
    for k, (a, l) in enumerate(zip(summary["per_node_accuracy"], summary["per_node_loss"])):
        t.add_row(str(k), f"{a:.4f}", f"{l:.4f}")
    t.add_section()
    t.add_row("mean", f"{summary['mean_accuracy']:.4f}", f"{summary['mean_loss']:.4f}")
    return t


def training_figure(summary: dict, path: Path) -> Path:
    """Train loss per step (median, quartiles and range over nodes), test accuracy at the
    evaluation steps (mean and range over nodes), and the consensus distance."""
    c = config_dict(summary.get("config"))
    gap = summary.get("topology", {}).get("spectral_gap")
    title = "dicejax train — " + config_line(c)
    if gap is not None:
        title += f"; spectral gap {gap:.3f}"
    fig, axes = figure(1, 3, 15, 4.2, title)
    lx, ax, cx = axes[0]
    mean = np.asarray(summary["train_loss_curve"], np.float64)
    steps = np.arange(1, mean.size + 1) - 1
    q = summary.get("train_loss_quantiles")
    if q:
        q = {k: np.asarray(v, np.float64) for k, v in q.items()}
        lx.fill_between(steps, q["min"], q["max"], color="C0", alpha=0.15, lw=0,
                        label="range over nodes")
        lx.fill_between(steps, q["q25"], q["q75"], color="C0", alpha=0.35, lw=0,
                        label="middle 50 % of nodes")
        lx.plot(steps, q["median"], color="C0", lw=1, label="median node")
    else:
        lx.plot(steps, mean, color="C0", lw=1, label="mean over nodes")
    lx.set(xlabel="step t", ylabel=r"train loss at $\theta_k^t$ (nats, own batch)",
           yscale="log", title="train loss per node")
    lx.legend(fontsize=8)
    curve = summary.get("eval_curve") or {}
    if len(curve) and len(curve.get("step", [])):
        st = np.asarray(curve["step"])
        if "min_accuracy" in curve:
            ax.fill_between(st, curve["min_accuracy"], curve["max_accuracy"], color="C1",
                            alpha=0.25, lw=0, label="range over nodes")
        ax.plot(st, curve["mean_accuracy"], marker="o", ms=3, color="C1", label="mean node")
        ax.legend(fontsize=8, loc="lower right")
        ax.set(title="test accuracy per node")
    else:
        acc = np.asarray(summary["per_node_accuracy"])
        ax.scatter(np.full(acc.size, mean.size), acc, s=12, color="C1", label="nodes")
        ax.set(title="final test accuracy per node (--eval-every 0: no curve)")
    ax.set(xlabel="step t", ylabel="test accuracy")
    cons = np.asarray(summary.get("consensus_distance", []), np.float64)
    if cons.size:
        cx.plot(np.arange(1, cons.size + 1), cons, color="C2", lw=1)
        if np.all(cons[np.isfinite(cons)] > 0):
            cx.set_yscale("log")
    cx.set(xlabel="step t (after its gossip)",
           ylabel=r"$\frac{1}{n}\sum_k \|\theta_k^t - \bar\theta^t\|^2$",
           title="consensus distance (squared parameter distance)")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# align
# --------------------------------------------------------------------------------------------

#: Long names of the alignment estimators (figure titles and file names).
ESTIMATOR_TEXT = {
    "E1 (paper)": "E1: the paper's first-order DICE-E (Taylor direct term)",
    "E1 + exact direct": "E1 with the exact direct term L(θ^{t+½}) − L(θ^t)",
    "E2": "E2: second order (probe-loss curvature terms)",
    "E2 + exact direct": "E2 with the exact direct term",
}

#: File-name stems of the alignment figures.
ESTIMATOR_FILES = {"E1 (paper)": "E1_paper", "E1 + exact direct": "E1_exact_direct",
                   "E2": "E2", "E2 + exact direct": "E2_exact_direct"}


def alignment_table(result: dict) -> Table:
    """Pearson / Spearman of each estimator against DICE-GT, per hop count r."""
    hops = len(result["scores"]["gt"])
    c = config_dict(result.get("train", {}).get("config"))
    t = table(f"DICE-E vs DICE-GT over {result['pairs_per_hop']} (node, step) pairs per hop"
              + (f" — {config_line(c)}" if c else ""),
              caption="Pearson / Spearman correlation of each estimate with the exact "
                      "counterfactual DICE-GT (1 = perfect). r: hops of the cascade (direct term "
                      "+ shells 1..r). E1: first order (the paper's); E2: + probe-loss "
                      "curvature; exact direct: the source's own change computed exactly. "
                      "network h: Σ_k q_k ΔL_k at step t + h (no direct term).")
    t.add_column("estimator")
    for r in range(1, hops + 1):
        t.add_column(f"r={r} Pearson", justify="right")
        t.add_column(f"r={r} Spearman", justify="right")
    for name, row in result["shells"].items():
        cells = []
        for r in range(1, hops + 1):
            cells += [_corr(row, r, "pearson"), _corr(row, r, "spearman")]
        t.add_row(name, *cells)
    t.add_section()
    for name, row in result["network"].items():
        cells = []
        for h in range(1, hops + 1):
            cells += [_corr(row, h, "pearson"), _corr(row, h, "spearman")]
        t.add_row(f"{name}, network h = r", *cells)
    return t


def _corr(row: Mapping, r: int, key: str) -> str:
    value = (row.get(r) or row.get(str(r)))[key]
    return "—" if value is None or not np.isfinite(value) else f"{value:.4f}"


def alignment_figure(result: dict, path: Path, estimator: str = "E1 (paper)") -> Path:
    """Scatter plots of DICE-GT against an estimator, one panel per hop count."""
    gt = result["scores"]["gt"]
    est = result["scores"][estimator]
    hops = len(gt)
    c = config_dict(result.get("train", {}).get("config"))
    title = (f"{ESTIMATOR_TEXT.get(estimator, estimator)} vs DICE-GT, "
             f"{result['pairs_per_hop']} (node, step) pairs"
             + (f"\n{config_line(c)}" if c else ""))
    fig, axes = figure(1, hops, 4.2 * hops, 4.4, title)
    for r in range(hops):
        ax = axes[0, r]
        x, y = np.ravel(np.asarray(gt[r], np.float64)), np.ravel(np.asarray(est[r], np.float64))
        ax.scatter(x, y, s=8, alpha=0.6)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        corr = result["shells"][estimator]
        cr = corr.get(r + 1) or corr.get(str(r + 1))
        ax.set(title=f"r = {r + 1}: Pearson {cr['pearson']:.3f}, Spearman {cr['spearman']:.3f}",
               xlabel="DICE-GT (exact), nats of probe loss",
               ylabel=f"{estimator} estimate, nats")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)
