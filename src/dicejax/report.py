"""Figures and terminal tables for experiment results (matplotlib and rich; no core logic)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table

# Piped output (files, CI logs) gets 140 columns so that the wide tables stay readable.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, soft_wrap=True)


def save_figure(fig, path: Path) -> Path:
    """Saves a matplotlib figure atomically (temporary file, then rename) and closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def accuracy_table(summary: dict) -> Table:
    """Per-node final test accuracy and loss."""
    table = Table(title=f"Per-node test accuracy ({summary['topology']['name']})")
    table.add_column("node", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    for k, (a, l) in enumerate(zip(summary["per_node_accuracy"], summary["per_node_loss"])):
        table.add_row(str(k), f"{a:.4f}", f"{l:.4f}")
    table.add_section()
    table.add_row("mean", f"{summary['mean_accuracy']:.4f}", f"{summary['mean_loss']:.4f}")
    return table


def training_figure(summary: dict, path: Path) -> Path:
    """Mean train loss per step and the evaluation curve."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(np.asarray(summary["train_loss_curve"]))
    axes[0].set(xlabel="step", ylabel="mean train loss", yscale="log")
    curve = summary.get("eval_curve") or {}
    if len(curve):
        axes[1].plot(curve["step"], curve["mean_accuracy"], marker="o")
    axes[1].set(xlabel="step", ylabel="mean test accuracy")
    return save_figure(fig, path)


def alignment_table(result: dict) -> Table:
    """Pearson / Spearman of each estimator against DICE-GT, per hop count r."""
    hops = len(result["scores"]["gt"])
    table = Table(title=f"DICE-E vs DICE-GT ({result['pairs_per_hop']} (node, step) pairs)")
    table.add_column("estimator")
    for r in range(1, hops + 1):
        table.add_column(f"r={r} Pearson", justify="right")
        table.add_column(f"r={r} Spearman", justify="right")
    for name, row in result["shells"].items():
        cells = []
        for r in range(1, hops + 1):
            cells += [f"{row[r]['pearson']:.4f}", f"{row[r]['spearman']:.4f}"]
        table.add_row(name, *cells)
    table.add_section()
    for name, row in result["network"].items():
        cells = []
        for h in range(1, hops + 1):
            cells += [f"{row[h]['pearson']:.4f}", f"{row[h]['spearman']:.4f}"]
        table.add_row(f"{name}, network h", *cells)
    return table


def alignment_figure(result: dict, path: Path, estimator: str = "E1 (paper)") -> Path:
    """Scatter plots of DICE-GT against an estimator, one panel per hop count."""
    gt = result["scores"]["gt"]
    est = result["scores"][estimator]
    hops = len(gt)
    fig, axes = plt.subplots(1, hops, figsize=(4 * hops, 3.8), squeeze=False)
    for r in range(hops):
        ax = axes[0, r]
        x, y = np.ravel(gt[r]), np.ravel(est[r])
        ax.scatter(x, y, s=6, alpha=0.6)
        lim = [min(x.min(), y.min()), max(x.max(), y.max())]
        ax.plot(lim, lim, "k--", lw=0.8)
        c = result["shells"][estimator][r + 1]
        ax.set(title=f"r = {r + 1}: Pearson {c['pearson']:.3f}", xlabel="DICE-GT",
               ylabel=estimator)
    return save_figure(fig, path)
