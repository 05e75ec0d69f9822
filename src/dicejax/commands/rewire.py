"""``dicejax rewire``: influence-guided collaborator selection against attackers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dicejax.commands import add_command, metadata, options, prepare, save_results
from dicejax.commands.detect import check_attackers, check_fractions


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax rewire`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "rewire",
        help="influence-guided rewiring vs the fixed graph under attack: honest nodes' accuracy",
        description="Every --period steps each node keeps its --keep most helpful candidates by "
                    "accumulated proximal influence. Compares arms paired by seed: clean (no "
                    "attack), fixed (the graph under attack), influence, random (same degree, "
                    "random choice), oracle (same degree, honest first). Writes rewire.json and "
                    "rewire.png.")
    out = run_args(p)
    options.add_checkpoint_arg(out if out is not None else p, "every finished seed and arm")
    g = p.add_argument_group("attack and rewiring")
    g.add_argument("--attack", default="label_permutation", choices=options.DETECT_ATTACKS,
                   help="the attack (see dicejax detect --help; label_noise mislabels a "
                        "--fraction of each batch)")
    g.add_argument("--attackers", type=options.attackers, default=None, metavar="IDS|random:K",
                   help="attacking node ids (e.g. 3,17) or random:K for K random attackers "
                        "per seed (default: a quarter of the nodes, at random)")
    g.add_argument("--keep", type=options.positive_int, default=None, metavar="K",
                   help="in-neighbours each node keeps, below --nodes (default: the starting "
                        "graph's in-degree)")
    g.add_argument("--period", type=options.positive_int, default=10, metavar="P",
                   help="steps between rewirings (below --steps)")
    g.add_argument("--candidates", default="all", choices=("all", "graph"),
                   help="choose among all nodes, or among the starting graph's in-neighbours")
    g.add_argument("--stride", type=options.positive_int, default=1, metavar="S",
                   help="score every S-th step of each period")
    g.add_argument("--decay", type=options.positive_float, default=1.0, metavar="D",
                   help="per-step discount of older influence, in (0, 1] (1: plain sum)")
    g.add_argument("--arms", type=options.name_list(options.ALL_ARMS),
                   default=list(options.ARMS), metavar="A,B,...",
                   help=f"comma-separated names from {','.join(options.ALL_ARMS)} (default: "
                        f"{','.join(options.ARMS)}; '+rule' arms gossip with a robust rule)")
    g.add_argument("--seeds", type=options.positive_int, default=5, metavar="K",
                   help="number of seeds: --seed, --seed + 1, ...")
    g.add_argument("--std", type=options.positive_float, default=10.0, metavar="S",
                   help="noise standard deviation of --attack gaussian_noise")
    options.add_adaptive_args(g)
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """``--keep < --nodes``, ``--period < --steps``, ``--decay <= 1``, attackers."""
    if isinstance(a.arms, str):  # a caller's string default
        a.arms = options.name_list(options.ALL_ARMS)(a.arms)
    if a.keep is not None and a.keep >= a.nodes:
        raise options.UsageError(f"--keep: {a.keep} in-neighbours need more than --nodes "
                                 f"{a.nodes} nodes (at most {a.nodes - 1})")
    if a.period >= a.steps:
        raise options.UsageError(f"--period: {a.period} must be below --steps {a.steps}")
    if a.decay > 1:
        raise options.UsageError(f"--decay: must lie in (0, 1], got {a.decay:g}")
    if a.attack == "label_noise":
        check_fractions([a.fraction], "--fraction", a.batch)
    check_attackers(a)


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a, [check])
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.rewire import rewiring

    seeds = list(range(config.seed, config.seed + a.seeds))
    arms = list(a.arms)
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        units = t.bar("seeds x arms", len(seeds) * len(arms), "runs", noun="run", ordinal=True)
        steps = t.bar("this run", config.steps, "steps")
        current = [None]

        def on_progress(i, arm, done):
            if current[0] != (i, arm):
                current[0] = (i, arm)
                t.reset(steps)
            t.update(steps, done, info=f"seed {seeds[i]}, {arm}")
            if done >= config.steps:
                t.update(units, i * len(arms) + arms.index(arm) + 1)

        result = rewiring(config, a.attack, a.attackers, a.keep, a.period, seeds, arms,
                          candidates=a.candidates, stride=a.stride, decay=a.decay, std=a.std,
                          fraction=a.fraction, on=a.on, off=a.off,
                          progress=on_progress, checkpoint_dir=a.checkpoint_dir)
    report.console.print(rewire_table(result))
    if "gain" in result and "influence" in result["gain"]:
        g = result["gain"]["influence"]
        wins = sum(r["arms"]["influence"]["accuracy"] > r["arms"]["fixed"]["accuracy"]
                   for r in result["per_seed"])
        report.console.print(
            f"influence-guided rewiring vs fixed graph: honest accuracy "
            f"{_signed(g, len(seeds))} (higher in {wins} of {report.seeds_text(seeds)}); "
            f"{result['wall_seconds']:.0f} s")
    return save_results(out, "rewire", result, {"rewire.png": rewire_figure}, metadata(a))


def attack_text(result: dict) -> str:
    """The attack with its strength, e.g. ``label_noise (fraction 0.25), on 1 / off 3
    steps`` (results written before the adaptive options read as before)."""
    text = result["attack"]
    if result.get("fraction") is not None:
        text += f" (fraction {result['fraction']:g})"
    elif result.get("std") is not None:
        text += f" (std {result['std']:g})"
    if result.get("off"):
        text += f", on {result['on']} / off {result['off']} steps"
    return text


def _signed(stat: dict, count: int) -> str:
    if count <= 1:
        return f"{stat['mean']:+.4f}"
    return f"{stat['mean']:+.4f} ± {stat['std']:.4f}"


def diverged_text(result: dict, arm: str) -> str:
    """``"attackers / honest"``: how many nodes of each kind diverged in ``arm``, over all
    seeds (``"0 / 0"`` when none did)."""
    bad = honest = 0
    for r in result["per_seed"]:
        nodes = [int(k) for k in r["arms"][arm].get("diverged", {})]
        bad += sum(k in r["attackers"] for k in nodes)
        honest += sum(k not in r["attackers"] for k in nodes)
    return f"{bad} / {honest}"


def rewire_table(result: dict) -> object:
    """One row per arm: honest accuracy and attackers' weight, mean ± std over seeds."""
    from dicejax import report

    seeds = result["seeds"]
    n = len(seeds)
    t = report.table(
        f"Rewiring under {attack_text(result)}: keep {result['keep']} of {result['candidates']} "
        f"candidates, every {result['period']} steps, {report.seeds_text(seeds)} — "
        f"{report.config_line(result.get('config'), seeds=seeds)}",
        caption="honest acc: honest nodes' mean test accuracy after the run"
                + (" (mean ± std over seeds)" if n > 1 else "")
                + "; min: the worst seed; vs fixed: paired difference to the fixed graph, seed "
                  "by seed; attacker weight: weight honest nodes put on attackers (their rows' "
                  "attacker mass), averaged over steps; diverged: attackers / honest nodes "
                  "whose updates turned non-finite, all seeds together (the run goes on "
                  "without them; a diverged honest node counts with accuracy 0); "
                  "time: wall seconds of the arm, all seeds together")
    cols = ["arm", "honest acc"] + (["min"] if n > 1 else []) + ["vs fixed", "attacker weight",
                                                                 "diverged", "time (s)"]
    for name in cols:
        t.add_column(name, justify="right")
    for arm in result["arms"]:
        acc, w = result["accuracy"][arm], result["attacker_weight"][arm]
        gain = result.get("gain", {}).get(arm)
        secs = sum(r["arms"][arm]["wall_seconds"] for r in result["per_seed"])
        row = [arm, report.mean_std(acc, n)] + ([f"{acc['min']:.4f}"] if n > 1 else [])
        row += ["" if gain is None else _signed(gain, n), report.mean_std(w, n, ".3f"),
                diverged_text(result, arm), f"{secs:.0f}"]
        t.add_row(*row)
    return t


def rewire_figure(result: dict, path: Path) -> Path:
    """Honest accuracy per arm and seed; attackers' weight in honest rows over time."""
    import numpy as np

    from dicejax import report

    arms = result["arms"]
    per_seed = result["per_seed"]
    seeds = result["seeds"]
    title = (f"dicejax rewire — {attack_text(result)}, keep {result['keep']} of "
             f"{result['candidates']}, every {result['period']} steps, "
             f"{report.seeds_text(seeds)}\n"
             f"{report.config_line(result.get('config'), seeds=seeds)}")
    fig, axes = report.figure(1, 2, 12.5, 4.8, title)
    ax, wx = axes[0]
    accs = np.asarray([[r["arms"][a]["accuracy"] for a in arms] for r in per_seed])  # [S, A]
    for r_i in range(len(per_seed)):  # pair seeds across arms
        ax.plot(range(len(arms)), accs[r_i], color="0.7", lw=0.7, zorder=1,
                label="one seed" if r_i == 0 and len(per_seed) > 1 else None)
    for i in range(len(arms)):
        ax.errorbar(i, accs[:, i].mean(), yerr=accs[:, i].std() if len(per_seed) > 1 else None,
                    fmt="D", color=f"C{i}", ms=7, capsize=4, zorder=3)
        ax.scatter(np.full(len(per_seed), i), accs[:, i], color=f"C{i}", edgecolor="k", s=18,
                   zorder=2)
    spread = accs.max() - accs.min()
    pad = max(0.15 * spread, 2e-3)
    ax.set(xticks=range(len(arms)), xticklabels=arms, xlim=(-0.5, len(arms) - 0.5),
           ylim=(accs.min() - pad, accs.max() + pad),
           ylabel="honest nodes' mean test accuracy",
           title="accuracy per arm (diamond: mean" + (" ± std" if len(per_seed) > 1 else "")
                 + "; dots: seeds)")
    if len(arms) > 4 or max(len(a) for a in arms) > 10:  # long or many names: slant them
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    if len(per_seed) > 1:
        ax.legend(fontsize=8, loc="lower left")
    period = result["period"]
    styles = ["-", "--", "-.", ":", (0, (5, 1))]
    for i, arm in enumerate(arms):
        curves = np.asarray([r["arms"][arm]["attacker_weight_per_period"] for r in per_seed])
        steps = np.arange(curves.shape[1] + 1) * period
        mean = curves.mean(axis=0)
        # earlier arms drawn wider, so that arms with equal curves stay visible
        wx.step(steps, np.append(mean, mean[-1]), where="post", color=f"C{i}",
                ls=styles[i % len(styles)], lw=4.0 - 2.6 * i / max(len(arms) - 1, 1),
                label=arm, alpha=0.85)
    total = report.config_dict(result.get("config")).get("steps")
    wx.set(xlabel="step", ylabel="weight honest nodes put on attackers",
           xlim=(0, total or steps[-1]),
           title="attackers' share of honest rows (mean over seeds)")
    wx.set_ylim(bottom=-0.01)
    wx.legend(fontsize=8, title="arm", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)  # beside the axes: never over a curve
    return report.save_figure(fig, path)
