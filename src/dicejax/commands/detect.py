"""``dicejax detect``: anomaly detection by proximal influence, ROC-AUC over seeds."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dicejax.commands import add_command, metadata, options, prepare, save_results

#: Kept for callers of the first CLI: ``_attackers("3,17")``, ``_attackers("random:2")``.
_attackers = options.attackers


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax detect`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "detect",
        help="anomaly detection by proximal influence: ROC-AUC, precision, recall",
        description="Some nodes attack (corrupted batches or manipulated updates). Each node "
                    "sums the proximal influence of each in-neighbour over the last --window "
                    "steps and flags neighbours whose robust z-score exceeds --threshold. "
                    "Reports edge-level ROC-AUC, precision and recall per seed; writes "
                    "detect.json and detect_roc.png.")
    out = run_args(p)
    options.add_checkpoint_arg(out if out is not None else p,
                               "every finished seed, and the training of the seed in progress")
    g = p.add_argument_group("attack and detection")
    g.add_argument("--attack", default="label_permutation", choices=options.ATTACKS,
                   help="label_permutation (labels shuffled within each batch, the paper's "
                        "label flipping), label_flip (all labels set to class 0), "
                        "gaussian_noise (inputs + N(0, --std²)), sign_flip (negated updates), "
                        "free_rider (no local updates)")
    g.add_argument("--attackers", type=options.attackers, default=1, metavar="IDS|random:K",
                   help="attacking node ids (e.g. 3 or 3,17) or random:K for K random "
                        "attackers per seed (default: random:1)")
    g.add_argument("--window", type=options.positive_int, default=100, metavar="W",
                   help="score the last W steps of the run (at most --steps)")
    g.add_argument("--seeds", type=options.positive_int, default=5, metavar="K",
                   help="number of seeds: --seed, --seed + 1, ...")
    g.add_argument("--threshold", type=options.positive_float, default=3.5, metavar="Z",
                   help="flag an in-neighbour whose robust z-score exceeds Z")
    g.add_argument("--std", type=options.positive_float, default=10.0, metavar="S",
                   help="noise standard deviation of --attack gaussian_noise (normalised "
                        "input units; the paper's variance 100 is 10)")
    g.add_argument("--strengths", type=options.positive_floats, default=None,
                   metavar="S,S,...",
                   help="a strength curve of --attack gaussian_noise: one detection per noise "
                        "standard deviation (same seeds and attackers); writes "
                        "detect_strength.json and detect_strength.png instead")
    g.add_argument("--chunk-steps", type=options.positive_int, default=25, metavar="S",
                   help="recorded steps held in memory at once while scoring")
    g.add_argument("--statistic", default="sum", choices=("sum", "t"),
                   help="score each edge by the summed influence over the window (sum) or "
                        "by its mean over standard error across the window's steps (t)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """``--window <= --steps``; attackers within the nodes."""
    if a.window > a.steps:
        raise options.UsageError(f"--window: {a.window} exceeds --steps {a.steps}")
    if getattr(a, "strengths", None) is not None and a.attack != "gaussian_noise":
        raise options.UsageError(f"--strengths: a strength curve needs --attack "
                                 f"gaussian_noise, got --attack {a.attack}")
    check_attackers(a)


def check_attackers(a: argparse.Namespace) -> None:
    """``--attackers``: ids in ``[0, nodes)``, or ``random:K`` with ``K < nodes``."""
    if a.attackers is None:
        return
    if isinstance(a.attackers, int):
        if a.attackers >= a.nodes:
            raise options.UsageError(f"--attackers: random:{a.attackers} needs fewer attackers "
                                     f"than --nodes {a.nodes}")
    else:
        options.check_nodes(a.attackers, a.nodes, "--attackers")
        if len(set(a.attackers)) >= a.nodes:
            raise options.UsageError("--attackers: at least one node must be honest")


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a, [check])
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.anomaly import detection

    seeds = list(range(config.seed, config.seed + a.seeds))
    if a.strengths is not None:
        return run_curve(a, out, config, seeds)
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        seed_bar = t.bar("seeds", len(seeds), "seeds", noun="seed", ordinal=True)
        step_bar = t.bar("this seed", config.steps, "steps")

        def on_seed(i, r):
            t.update(seed_bar, i + 1, info=f"last ROC-AUC {r['roc_auc']:.4f}")

        current = [0]

        def on_steps(i, done):
            if i != current[0]:
                current[0] = i
                t.reset(step_bar)
            t.update(step_bar, done, info=f"training and scoring seed {seeds[i]}")

        result = detection(config, a.attack, a.attackers, a.window, seeds, a.threshold,
                           std=a.std, chunk_steps=a.chunk_steps, callback=on_seed,
                           progress=on_steps, checkpoint_dir=a.checkpoint_dir,
                           statistic=a.statistic)
    report.console.print(detection_table(result))
    n = len(seeds)
    report.console.print(
        f"ROC-AUC {report.mean_std(result['roc_auc'], n)}, precision "
        f"{report.mean_std(result['precision'], n)}, recall "
        f"{report.mean_std(result['recall'], n)} at z > {result['threshold']:g} "
        f"({report.seeds_text(seeds)}); {result['wall_seconds']:.1f} s")
    return save_results(out, "detect", result, {"detect_roc.png": roc_figure}, metadata(a))


def run_curve(a: argparse.Namespace, out: Path, config, seeds: list[int]) -> int:
    """``--strengths``: one detection per noise standard deviation."""
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.anomaly import strength_curve

    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        std_bar = t.bar("strengths", len(a.strengths), "strengths", noun="strength",
                        ordinal=True)
        step_bar = t.bar("this seed", config.steps, "steps")
        current = [(0, 0)]

        def on_point(i, r):
            t.update(std_bar, i + 1, info=f"std {a.strengths[i]:g}: ROC-AUC "
                                          f"{r['roc_auc']['mean']:.4f}")

        def on_steps(i, seed, done):
            if (i, seed) != current[0]:
                current[0] = (i, seed)
                t.reset(step_bar)
            t.update(step_bar, done, info=f"std {a.strengths[i]:g}, seed {seeds[seed]}")

        result = strength_curve(config, a.strengths, a.attackers, a.window, seeds,
                                a.threshold, statistic=a.statistic, chunk_steps=a.chunk_steps,
                                callback=on_point, progress=on_steps,
                                checkpoint_dir=a.checkpoint_dir)
    report.console.print(strength_table(result))
    return save_results(out, "detect_strength", result,
                        {"detect_strength.png": strength_figure}, metadata(a))


#: The columns of the strength curve: (result key, header).
CURVE_KEYS = (("roc_auc", "AUC"), ("precision", "prec"), ("recall", "recall"),
              ("combined_precision", "comb. prec"), ("combined_recall", "comb. recall"),
              ("honest_accuracy", "honest acc"))


def strength_table(result: dict) -> object:
    """One row per noise standard deviation: mean ± std over seeds of each measure."""
    from dicejax import report

    seeds = result["seeds"]
    t = report.table(
        f"Detection against noise strength: gaussian_noise, last {result['window']} steps "
        f"scored, flag z > {result['threshold']:g}, statistic {result['statistic']}, "
        f"{report.seeds_text(seeds)} — {report.config_line(result.get('config'), seeds=seeds)}",
        caption="Each row: dicejax detect --attack gaussian_noise --std S with these seeds "
                "(mean ± std over seeds). AUC: edge-level ROC-AUC; prec(ision), recall: of "
                "the influence rule (z > threshold); comb.: the combined detector (update "
                "norms too); honest acc: honest nodes' mean test accuracy after the run.")
    t.add_column("std", justify="right")
    for _, name in CURVE_KEYS:
        t.add_column(name, justify="right")
    t.add_column("time (s)", justify="right")
    for std, point in zip(result["stds"], result["points"], strict=True):
        t.add_row(f"{std:g}", *[report.mean_std(point[k], len(seeds)) for k, _ in CURVE_KEYS],
                  f"{point['wall_seconds']:.0f}")
    return t


def strength_figure(result: dict, path: Path) -> Path:
    """ROC-AUC, recall (influence rule and combined) and honest accuracy against the noise
    standard deviation (mean ± std over seeds)."""
    import numpy as np

    from dicejax import report

    seeds = result["seeds"]
    title = (f"dicejax detect --strengths — gaussian_noise, last {result['window']} steps "
             f"scored, z > {result['threshold']:g}, {report.seeds_text(seeds)}\n"
             f"{report.config_line(result.get('config'), seeds=seeds)}")
    fig, axes = report.figure(1, 2, 11.5, 4.6, title)
    qx, ax = axes[0]
    x = np.asarray(result["stds"], float)

    def curve(axis, key, label, **kw):
        m = np.array([p[key]["mean"] for p in result["points"]], float)
        sd = np.array([p[key]["std"] for p in result["points"]], float)
        axis.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=label, **kw)

    curve(qx, "roc_auc", "ROC-AUC (influence z-scores)")
    curve(qx, "recall", f"recall, influence rule (z > {result['threshold']:g})")
    curve(qx, "combined_recall", "recall, combined detector (+ update norms)", ls="--")
    curve(qx, "precision", "precision, influence rule", ls=":")
    qx.set(xscale="log", xlabel="noise standard deviation (normalised input units, log)",
           ylabel="edge-level score", ylim=(-0.03, 1.05), title="detection quality")
    qx.legend(fontsize=7, loc="lower right")
    curve(ax, "honest_accuracy", "honest nodes' mean test accuracy")
    ax.set(xscale="log", xlabel="noise standard deviation (normalised input units, log)",
           ylabel="test accuracy", title="what the attacker costs the honest nodes")
    ax.legend(fontsize=7, loc="lower left")
    for axis in (qx, ax):  # the measured strengths as the ticks, no log-scale minor labels
        axis.set_xticks(x, [f"{v:g}" for v in x])
        axis.minorticks_off()
    return report.save_figure(fig, path)


def detection_table(result: dict) -> object:
    """One row per seed, then the mean and standard deviation over seeds (if several)."""
    from dicejax import report

    seeds = result["seeds"]
    extra = {"gaussian_noise": f", std {result.get('std')}",
             "label_flip": f", target {result.get('target')}"}.get(result["attack"], "")
    t = report.table(
        f"Anomaly detection: {result['attack']}{extra}, last {result['window']} steps scored, "
        f"flag z > {result['threshold']:g}, {report.seeds_text(seeds)} — "
        f"{report.config_line(result.get('config'), seeds=seeds)}",
        caption="Edge level: an edge j → k is positive when the sender j is an attacker. AUC: "
                "ROC-AUC of the robust z-scores over all edges; prec(ision), recall: of the "
                "flagged edges (z > threshold); top-1: share of attacked nodes that rank an "
                "attacker first; comb. prec / recall: the combined detector, which also "
                "flags in-neighbours whose mean update norm is below 0.1x or above 5x the "
                "neighbourhood's median (free-riders, noise); suspected: the type most "
                "observers suspect for each attacker; honest acc: honest nodes' mean test "
                "accuracy after the run; "
                "time (s): wall seconds of the seed (training, scoring, evaluation). "
                + ("mean and std: over the seeds." if len(seeds) > 1 else ""))
    for name in ("seed", "attackers", "AUC", "prec", "recall", "top-1", "comb. prec",
                 "comb. recall", "suspected", "honest acc", "time (s)"):
        t.add_column(name, justify="right")
    nan = float("nan")
    for r in result["per_seed"]:
        kinds = r.get("suspected", {})
        t.add_row(str(r["seed"]), ",".join(map(str, r["attackers"])),
                  f"{r['roc_auc']:.4f}", f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                  f"{r['top1']:.4f}", f"{r.get('combined_precision', nan):.4f}",
                  f"{r.get('combined_recall', nan):.4f}",
                  ",".join(kinds.get(str(a), "-") for a in r["attackers"]),
                  f"{r['honest_accuracy']:.4f}", f"{r['wall_seconds']:.0f}")
    if len(seeds) > 1:
        t.add_section()
        keys = ("roc_auc", "precision", "recall", "top1", "combined_precision",
                "combined_recall")
        mean_time = sum(r["wall_seconds"] for r in result["per_seed"]) / len(seeds)
        t.add_row("mean", "", *[f"{result[k]['mean']:.4f}" for k in keys], "",
                  f"{result['honest_accuracy']['mean']:.4f}", f"{mean_time:.0f}")
        t.add_row("std", "", *[f"{result[k]['std']:.4f}" for k in keys], "",
                  f"{result['honest_accuracy']['std']:.4f}", "")
    return t


def roc_figure(result: dict, path: Path) -> Path:
    """ROC curve of every seed, and the z-scores of honest and attacking senders."""
    import numpy as np

    from dicejax import report

    seeds = result["seeds"]
    extra = {"gaussian_noise": f" (std {result.get('std')})",
             "label_flip": f" (to class {result.get('target')})"}.get(result["attack"], "")
    title = (f"dicejax detect — {result['attack']}{extra}, last {result['window']} steps "
             f"scored, {report.seeds_text(seeds)}\n"
             f"{report.config_line(result.get('config'), seeds=seeds)}")
    fig, axes = report.figure(1, 2, 11.5, 4.8, title)
    ax, hx = axes[0]
    for r in result["per_seed"]:
        ax.step(np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"]), where="post",
                label=f"seed {r['seed']}: AUC {r['roc_auc']:.3f}", alpha=0.8)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    auc = result["roc_auc"]
    ax.set(xlabel="false positive rate (honest senders' edges)",
           ylabel="true positive rate (attackers' edges)",
           title=f"edge-level ROC: AUC {report.mean_std(auc, len(seeds), '.3f')}",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(fontsize=7, loc="lower right", ncol=1 if len(seeds) <= 6 else 2)
    honest, attacked = [], []
    for r in result["per_seed"]:
        z = np.asarray(r["scores"], dtype=float)  # None (no edge) -> nan
        is_attacker = np.isin(np.arange(z.shape[1]), r["attackers"])[None, :]
        ok = np.isfinite(z)
        honest.append(z[ok & ~is_attacker])
        attacked.append(z[ok & is_attacker])
    honest, attacked = np.concatenate(honest), np.concatenate(attacked)
    both = np.concatenate([honest, attacked])
    lo = min(both.min() if both.size else -1.0, -1.0)
    hi = max(both.max() if both.size else 1.0, result["threshold"]) + 1.0
    bins = np.linspace(lo, hi, 60)
    hx.hist(honest, bins=bins, alpha=0.6, label=f"honest senders ({honest.size} edges)")
    hx.hist(attacked, bins=bins, alpha=0.8, label=f"attackers ({attacked.size} edges)")
    hx.axvline(result["threshold"], color="k", ls="--", lw=0.8,
               label=f"threshold z = {result['threshold']:g}")
    hx.set(xlabel="robust z-score of the accumulated proximal influence (> 0: harmful)",
           ylabel="edges (log scale)", yscale="log",
           title=f"z-scores of every edge, {report.seeds_text(seeds)}")
    hx.legend(fontsize=7)
    return report.save_figure(fig, path)
