"""``dicejax rewire``: influence-guided collaborator selection against attackers."""

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
from dicejax.commands.detect import _attackers
from dicejax.experiments.anomaly import ATTACKS
from dicejax.experiments.common import RunConfig
from dicejax.experiments.rewire import ARMS


def register(subparsers, run_args: Callable[[argparse.ArgumentParser], None],
             make_config: Callable[[argparse.Namespace], RunConfig]) -> None:
    """Adds ``dicejax rewire`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "rewire", help="influence-guided rewiring vs the fixed graph under attack: honest "
                       "nodes' accuracy")
    run_args(p)
    p.add_argument("--attack", default="label_permutation", choices=ATTACKS)
    p.add_argument("--attackers", type=_attackers, default=None,
                   help="attacking node ids (e.g. 3,17) or random:K for K random attackers "
                        "per seed (default: a quarter of the nodes, at random)")
    p.add_argument("--keep", type=int, default=None,
                   help="in-neighbours each node keeps (default: the graph's in-degree)")
    p.add_argument("--period", type=int, default=25, help="steps between rewirings")
    p.add_argument("--candidates", default="all", choices=("all", "graph"),
                   help="choose among all nodes (default) or the starting graph's "
                        "in-neighbours")
    p.add_argument("--stride", type=int, default=1,
                   help="score every STRIDE-th step of each period")
    p.add_argument("--decay", type=float, default=1.0,
                   help="per-step discount of older influence (1 = plain sum)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=5,
                   help="number of seeds: --seed, --seed + 1, ... (default 5)")
    p.add_argument("--std", type=float, default=10.0, help="gaussian_noise standard deviation")
    p.set_defaults(fn=lambda a: _run(a, make_config))


def _run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], RunConfig]) -> int:
    from dicejax.experiments.rewire import rewiring

    config = make_config(a)
    if a.seeds < 1:
        raise ValueError(f"--seeds: must be a positive integer, got {a.seeds}")
    seeds = list(range(config.seed, config.seed + a.seeds))
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    out = Path(a.out)
    with report.console.status(f"{a.attack}: training {len(arms)} arms x {len(seeds)} "
                               f"seeds ...") as s:
        result = rewiring(
            config, a.attack, a.attackers, a.keep, a.period, seeds, arms,
            candidates=a.candidates, stride=a.stride, decay=a.decay, std=a.std,
            callback=lambda i, r: s.update(f"{a.attack}: seed {i + 1}/{len(seeds)} done"))
    report.console.print(rewire_table(result))
    if "gain" in result and "influence" in result["gain"]:
        g = result["gain"]["influence"]
        wins = sum(r["arms"]["influence"]["accuracy"] > r["arms"]["fixed"]["accuracy"]
                   for r in result["per_seed"])
        report.console.print(
            f"influence-guided rewiring vs fixed graph: honest accuracy "
            f"{g['mean']:+.4f} ± {g['std']:.4f} (higher in {wins}/{len(seeds)} seeds); "
            f"{result['wall_seconds']:.0f} s")
    return save_results(out, "rewire", result, {"rewire.png": rewire_figure})


def rewire_table(result: dict) -> Table:
    """One row per arm: honest accuracy and attackers' weight, mean ± std over seeds."""
    table = Table(title=f"Rewiring under {result['attack']}: keep {result['keep']} of "
                        f"{result['candidates']} candidates, every {result['period']} steps, "
                        f"{len(result['seeds'])} seeds")
    for name in ("arm", "honest acc", "± std", "min", "vs fixed", "attacker weight", "s"):
        table.add_column(name, justify="right")
    for arm in result["arms"]:
        acc, w = result["accuracy"][arm], result["attacker_weight"][arm]
        gain = result.get("gain", {}).get(arm)
        secs = sum(r["arms"][arm]["wall_seconds"] for r in result["per_seed"])
        table.add_row(arm, f"{acc['mean']:.4f}", f"{acc['std']:.4f}", f"{acc['min']:.4f}",
                      "" if gain is None else f"{gain['mean']:+.4f} ± {gain['std']:.4f}",
                      f"{w['mean']:.3f}", f"{secs:.0f}")
    table.caption = ("honest acc: honest nodes' mean test accuracy after the run; vs fixed: "
                     "paired difference by seed; attacker weight: mass honest nodes put on "
                     "attackers, averaged over steps")
    return table


def rewire_figure(result: dict, path: Path) -> Path:
    """Honest accuracy per arm and seed; attackers' weight in honest rows over time."""
    arms = result["arms"]
    fig, (ax, wx) = plt.subplots(1, 2, figsize=(11, 4.2))
    per_seed = result["per_seed"]
    for i, arm in enumerate(arms):
        accs = np.asarray([r["arms"][arm]["accuracy"] for r in per_seed])
        ax.bar(i, accs.mean(), color=f"C{i}", alpha=0.5)
        ax.scatter(np.full(accs.size, i) + np.linspace(-0.2, 0.2, accs.size), accs,
                   color=f"C{i}", edgecolor="k", zorder=3, s=18)
    for r in per_seed:  # pair seeds across arms
        ax.plot(range(len(arms)), [r["arms"][a]["accuracy"] for a in arms], color="0.6",
                lw=0.6, zorder=2)
    lo = min(r["arms"][a]["accuracy"] for r in per_seed for a in arms)
    hi = max(r["arms"][a]["accuracy"] for r in per_seed for a in arms)
    ax.set(xticks=range(len(arms)), xticklabels=arms, ylabel="honest nodes' mean test accuracy",
           ylim=(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3)),
           title=f"{result['attack']}, {len(per_seed)} seeds (lines pair a seed)")
    period = result["period"]
    for i, arm in enumerate(arms):
        curves = np.asarray([r["arms"][arm]["attacker_weight_per_period"] for r in per_seed])
        steps = np.arange(curves.shape[1]) * period
        wx.step(steps, curves.mean(axis=0), where="post", color=f"C{i}", label=arm)
    wx.set(xlabel="step", ylabel="weight honest nodes put on attackers",
           title="attackers' share of honest rows (mean over seeds)")
    wx.legend(fontsize=8)
    return report.save_figure(fig, path)
