"""``dicejax detect``: anomaly detection by proximal influence, ROC-AUC over seeds."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from dicejax import report
from dicejax.commands import save_results
from dicejax.experiments.anomaly import ATTACKS
from dicejax.experiments.common import RunConfig


def _attackers(text: str) -> int | list[int]:
    """``"3"`` or ``"3,17"`` (node ids) or ``"random:K"`` (K random attackers per seed)."""
    text = text.strip()
    try:
        if text.startswith("random:"):
            return int(text.split(":", 1)[1])
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected node ids like 3,17 or random:K, got {text!r}") from None


def register(subparsers, run_args: Callable[[argparse.ArgumentParser], None],
             make_config: Callable[[argparse.Namespace], RunConfig]) -> None:
    """Adds ``dicejax detect`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "detect", help="anomaly detection by proximal influence: ROC-AUC, precision, recall")
    run_args(p)
    p.add_argument("--attack", default="label_permutation", choices=ATTACKS)
    p.add_argument("--attackers", type=_attackers, default=1,
                   help="attacking node ids (e.g. 3 or 3,17) or random:K for K random "
                        "attackers per seed (default random:1)")
    p.add_argument("--window", type=int, default=100, help="score the last WINDOW steps")
    p.add_argument("--seeds", type=int, default=5,
                   help="number of seeds: --seed, --seed + 1, ... (default 5)")
    p.add_argument("--threshold", type=float, default=3.5, help="flag robust z-scores above")
    p.add_argument("--std", type=float, default=10.0, help="gaussian_noise standard deviation")
    p.add_argument("--chunk-steps", type=int, default=25,
                   help="recorded steps held in memory at once")
    p.set_defaults(fn=lambda a: _run(a, make_config))


def _run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], RunConfig]) -> int:
    from dicejax.experiments.anomaly import detection

    config = make_config(a)
    if a.seeds < 1:
        raise ValueError(f"--seeds: must be a positive integer, got {a.seeds}")
    seeds = list(range(config.seed, config.seed + a.seeds))
    out = Path(a.out)
    with report.console.status(f"{a.attack}: training and scoring {len(seeds)} seeds ...") as s:
        result = detection(
            config, a.attack, a.attackers, a.window, seeds, a.threshold, std=a.std,
            chunk_steps=a.chunk_steps,
            callback=lambda i, r: s.update(f"{a.attack}: seed {i + 1}/{len(seeds)} done, "
                                           f"ROC-AUC {r['roc_auc']:.4f}"))
    report.console.print(detection_table(result))
    report.console.print(
        f"ROC-AUC {result['roc_auc']['mean']:.4f} ± {result['roc_auc']['std']:.4f}, "
        f"precision {result['precision']['mean']:.4f}, recall {result['recall']['mean']:.4f} "
        f"at z > {result['threshold']} over {len(seeds)} seeds; "
        f"{result['wall_seconds']:.1f} s")
    return save_results(out, "detect", result, {"detect_roc.png": roc_figure})


def detection_table(result: dict) -> Table:
    """One row per seed, then the mean and standard deviation over seeds."""
    table = Table(title=f"Anomaly detection: {result['attack']}, window {result['window']}, "
                        f"z > {result['threshold']}")
    for name in ("seed", "attackers", "AUC", "prec", "recall", "top-1", "acc", "s"):
        table.add_column(name, justify="right")
    for r in result["per_seed"]:
        table.add_row(str(r["seed"]), ",".join(map(str, r["attackers"])),
                      f"{r['roc_auc']:.4f}", f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                      f"{r['top1']:.4f}", f"{r['honest_accuracy']:.4f}",
                      f"{r['wall_seconds']:.0f}")
    table.add_section()
    keys = ("roc_auc", "precision", "recall", "top1", "honest_accuracy")
    table.add_row("mean", "", *[f"{result[k]['mean']:.4f}" for k in keys],
                  f"{result['wall_seconds']:.0f}")
    table.add_row("std", "", *[f"{result[k]['std']:.4f}" for k in keys], "")
    table.caption = ("AUC, prec(ision), recall: edge level (positive: the sender is an "
                     "attacker); top-1: attacked nodes ranking an attacker first; acc: honest "
                     "nodes' mean test accuracy")
    return table


def roc_figure(result: dict, path: Path) -> Path:
    """ROC curve of every seed, and the z-scores of honest and attacking senders."""
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in result["per_seed"]:
        ax.step(np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"]), where="post",
                label=f"seed {r['seed']}: AUC {r['roc_auc']:.3f}", alpha=0.8)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    auc = result["roc_auc"]
    ax.set(xlabel="false positive rate (honest edges)", ylabel="true positive rate",
           title=f"{result['attack']}: ROC-AUC {auc['mean']:.3f} ± {auc['std']:.3f}",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    honest, attacked = [], []
    for r in result["per_seed"]:
        z = np.asarray(r["scores"], dtype=float)  # None (no edge) -> nan
        is_attacker = np.isin(np.arange(z.shape[1]), r["attackers"])[None, :]
        ok = np.isfinite(z)
        honest.append(z[ok & ~is_attacker])
        attacked.append(z[ok & is_attacker])
    honest, attacked = np.concatenate(honest), np.concatenate(attacked)
    lo = min(honest.min(), attacked.min(), -1.0)
    hi = max(honest.max(), attacked.max(), result["threshold"]) + 1.0
    bins = np.linspace(lo, hi, 60)
    hx.hist(honest, bins=bins, alpha=0.6, label=f"honest senders ({honest.size} edges)")
    hx.hist(attacked, bins=bins, alpha=0.8, label=f"attackers ({attacked.size} edges)")
    hx.axvline(result["threshold"], color="k", ls="--", lw=0.8, label="threshold")
    hx.set(xlabel="robust z-score of accumulated proximal influence", ylabel="edges",
           yscale="log", title="all seeds")
    hx.legend(fontsize=7)
    return report.save_figure(fig, path)
