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
                    "detect.json and detect_roc.png. Adaptive attackers: --attack label_noise "
                    "mislabels only a --fraction of each batch; --on/--off make any attack "
                    "intermittent. Curves: --strengths (noise std or label-noise fraction) "
                    "or --duties (duty cycle) write detect_strength.json and "
                    "detect_strength.png instead.")
    out = run_args(p)
    options.add_checkpoint_arg(out if out is not None else p,
                               "every finished seed, and the training of the seed in progress")
    g = p.add_argument_group("attack and detection")
    g.add_argument("--attack", default="label_permutation", choices=options.DETECT_ATTACKS,
                   help="label_permutation (labels shuffled within each batch, the paper's "
                        "label flipping), label_flip (all labels set to class 0), "
                        "gaussian_noise (inputs + N(0, --std²)), label_noise (a --fraction of "
                        "each batch given random wrong classes), sign_flip (negated updates), "
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
    options.add_adaptive_args(g)
    g.add_argument("--strengths", type=options.positive_floats, default=None,
                   metavar="S,S,...",
                   help="a strength curve: one detection per value (same seeds and "
                        "attackers) of the noise standard deviation of --attack "
                        "gaussian_noise, or of the fraction F in (0, 1] of --attack "
                        "label_noise (replacing --std or --fraction); writes "
                        "detect_strength.json and detect_strength.png instead")
    g.add_argument("--duties", type=options.positive_floats, default=None, metavar="D,D,...",
                   help="a duty-cycle curve of an intermittent attacker (any --attack): one "
                        "detection per duty cycle D in (0, 1], the share of steps attacked: "
                        "on for --on steps, off for round(on/D) - on steps (with --on 1, "
                        "D = 1, 0.5, 0.25, 0.1 attack every step, 1 in 2, 1 in 4, 1 in 10); "
                        "--off is set by D; writes detect_strength.json and "
                        "detect_strength.png instead")
    g.add_argument("--chunk-steps", type=options.positive_int, default=25, metavar="S",
                   help="recorded steps held in memory at once while scoring")
    g.add_argument("--statistic", default="sum", choices=("sum", "t"),
                   help="score each edge by the summed influence over the window (sum) or "
                        "by its mean over standard error across the window's steps (t)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """``--window <= --steps``; attackers within the nodes; the adaptive attack's options."""
    if a.window > a.steps:
        raise options.UsageError(f"--window: {a.window} exceeds --steps {a.steps}")
    strengths, duties = getattr(a, "strengths", None), getattr(a, "duties", None)
    if strengths is not None and duties is not None:
        raise options.UsageError("--duties: sweeps the duty cycle; it cannot be combined with "
                                 "--strengths (one curve per command)")
    if strengths is not None and a.attack not in ("gaussian_noise", "label_noise"):
        raise options.UsageError(f"--strengths: a strength curve needs --attack "
                                 f"gaussian_noise (noise std) or label_noise (fraction), got "
                                 f"--attack {a.attack}; --duties sweeps the duty cycle of any "
                                 f"attack")
    if a.attack == "label_noise":
        check_fractions(strengths if strengths is not None else [a.fraction],
                        "--strengths" if strengths is not None else "--fraction", a.batch)
    if duties is not None:
        bad = [d for d in duties if d > 1]
        if bad:
            raise options.UsageError(f"--duties: a duty cycle is the share of steps attacked, "
                                     f"in (0, 1], got {', '.join(f'{d:g}' for d in bad)}")
        if a.off != 0:
            raise options.UsageError(f"--off: --duties sets the honest steps itself (off = "
                                     f"round(on/D) - on); drop --off {a.off}")
    check_attackers(a)


def check_fractions(fractions: list[float], flag: str, batch: int) -> None:
    """Label-noise fractions in ``(0, 1]`` that mislabel at least one of ``batch`` labels."""
    bad = [f for f in fractions if f > 1]
    if bad:
        raise options.UsageError(f"{flag}: the share of each batch mislabelled by label_noise "
                                 f"must lie in (0, 1], got {', '.join(f'{f:g}' for f in bad)}")
    none = [f for f in fractions if round(f * batch) == 0]
    if none:
        raise options.UsageError(f"{flag}: round(F · --batch {batch}) = 0 labels for F = "
                                 f"{', '.join(f'{f:g}' for f in none)}: label_noise would "
                                 f"change nothing; use F > {0.5 / batch:g} or a larger "
                                 f"--batch")


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
    if a.strengths is not None or a.duties is not None:
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
                           statistic=a.statistic, fraction=a.fraction, on=a.on, off=a.off)
    report.console.print(detection_table(result))
    n = len(seeds)
    report.console.print(
        f"ROC-AUC {report.mean_std(result['roc_auc'], n)}, precision "
        f"{report.mean_std(result['precision'], n)}, recall "
        f"{report.mean_std(result['recall'], n)} at z > {result['threshold']:g} "
        f"({report.seeds_text(seeds)}); {result['wall_seconds']:.1f} s")
    return save_results(out, "detect", result, {"detect_roc.png": roc_figure}, metadata(a))


def run_curve(a: argparse.Namespace, out: Path, config, seeds: list[int]) -> int:
    """``--strengths`` (noise std or label-noise fraction) or ``--duties`` (duty cycle): one
    detection per value."""
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.anomaly import strength_curve

    if a.duties is not None:
        values, sweep = a.duties, "duty"
    else:
        values, sweep = a.strengths, ("std" if a.attack == "gaussian_noise" else "fraction")
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        std_bar = t.bar("strengths", len(values), "strengths", noun="strength",
                        ordinal=True)
        step_bar = t.bar("this seed", config.steps, "steps")
        current = [(0, 0)]

        def on_point(i, r):
            t.update(std_bar, i + 1, info=f"{sweep} {values[i]:g}: ROC-AUC "
                                          f"{r['roc_auc']['mean']:.4f}")

        def on_steps(i, seed, done):
            if (i, seed) != current[0]:
                current[0] = (i, seed)
                t.reset(step_bar)
            t.update(step_bar, done, info=f"{sweep} {values[i]:g}, seed {seeds[seed]}")

        result = strength_curve(config, values, a.attackers, a.window, seeds, a.threshold,
                                attack=a.attack, sweep=sweep, std=a.std, fraction=a.fraction,
                                on=a.on, statistic=a.statistic, chunk_steps=a.chunk_steps,
                                callback=on_point, progress=on_steps,
                                checkpoint_dir=a.checkpoint_dir)
    report.console.print(strength_table(result))
    return save_results(out, "detect_strength", result,
                        {"detect_strength.png": strength_figure}, metadata(a))


#: The columns of the strength curve: (result key, header).
CURVE_KEYS = (("roc_auc", "AUC"), ("precision", "prec"), ("recall", "recall"),
              ("combined_precision", "comb. prec"), ("combined_recall", "comb. recall"),
              ("honest_accuracy", "honest acc"))


#: What a curve sweeps (``result["sweep"]``): (table header, what, x axis label with units).
SWEEP_LABELS = {
    "std": ("std", "noise strength",
            "noise standard deviation (normalised input units, log scale)"),
    "fraction": ("fraction", "label-noise fraction",
                 "label_noise fraction F: share of each attacked batch mislabelled (log scale)"
                 "\nticks: F, then labels changed / batch size"),
    "duty": ("duty (on:off)", "duty cycle",
             "duty cycle on / (on + off): share of steps attacked (log scale)"
             "\nticks: duty, then attacked:honest steps per period"),
}


def curve_sweep(result: dict) -> str:
    """What a strength curve swept: ``"std"`` for results written before the field."""
    return result.get("sweep") or "std"


def curve_attack(result: dict) -> str:
    """The attack of a strength curve with its fixed settings, e.g. ``intermittent
    label_noise (fraction 0.5)``."""
    attack, sweep = result["attack"], curve_sweep(result)
    fixed = {"gaussian_noise": f"std {result.get('std')}" if sweep != "std" else None,
             "label_noise": f"fraction {result.get('fraction')}" if sweep != "fraction"
             else None}.get(attack)
    text = f"intermittent {attack}" if sweep == "duty" else attack
    return f"{text} ({fixed})" if fixed else text


def curve_ticks(result: dict) -> list[str]:
    """One x tick label per strength: the value, and for a fraction the labels changed per
    batch, for a duty cycle the on:off steps."""
    sweep = curve_sweep(result)
    values = result.get("strengths") or result["stds"]
    ticks = []
    for value, point in zip(values, result["points"], strict=True):
        if sweep == "fraction":
            ticks.append(f"{value:g}\n{point['mislabelled']}/{_batch(result.get('config'))}")
        elif sweep == "duty":
            ticks.append(f"{point['duty']:g}\n{point['on']}:{point['off']}")
        else:
            ticks.append(f"{value:g}")
    return ticks


def _batch(config: object) -> object:
    return config.get("batch", "B") if isinstance(config, dict) else getattr(config, "batch", "B")


def strength_table(result: dict) -> object:
    """One row per strength (noise std, label-noise fraction or duty cycle): mean ± std over
    seeds of each measure."""
    from dicejax import report

    seeds, sweep = result["seeds"], curve_sweep(result)
    header, what, _ = SWEEP_LABELS[sweep]
    command = {"std": "--attack gaussian_noise --std S",
               "fraction": "--attack label_noise --fraction F",
               "duty": f"--attack {result['attack']} --on ON --off OFF"}[sweep]
    t = report.table(
        f"Detection against {what}: {curve_attack(result)}, last {result['window']} steps "
        f"scored, flag z > {result['threshold']:g}, statistic {result['statistic']}, "
        f"{report.seeds_text(seeds)} — {report.config_line(result.get('config'), seeds=seeds)}",
        caption=f"Each row: dicejax detect {command} with these seeds "
                "(mean ± std over seeds). AUC: edge-level ROC-AUC; prec(ision), recall: of "
                "the influence rule (z > threshold); comb.: the combined detector (update "
                "norms too); honest acc: honest nodes' mean test accuracy after the run."
                + (" scored: attacked steps among the scored window." if sweep == "duty"
                   else ""))
    t.add_column(header, justify="right")
    if sweep == "duty":
        t.add_column("scored", justify="right")
    for _, name in CURVE_KEYS:
        t.add_column(name, justify="right")
    t.add_column("time (s)", justify="right")
    for tick, point in zip(curve_ticks(result), result["points"], strict=True):
        lead = [tick.replace("\n", " (") + ")" if "\n" in tick else tick]
        if sweep == "duty":
            lead.append(str(point["attacked_steps_scored"]))
        t.add_row(*lead, *[report.mean_std(point[k], len(seeds)) for k, _ in CURVE_KEYS],
                  f"{point['wall_seconds']:.0f}")
    return t


def strength_figure(result: dict, path: Path) -> Path:
    """ROC-AUC, recall (influence rule and combined) and honest accuracy against what was
    swept — noise standard deviation, label-noise fraction or duty cycle (mean ± std over
    seeds, log x axis)."""
    import numpy as np

    from dicejax import report

    seeds, sweep = result["seeds"], curve_sweep(result)
    _, _, xlabel = SWEEP_LABELS[sweep]
    flag = "--duties" if sweep == "duty" else "--strengths"
    title = (f"dicejax detect {flag} — {curve_attack(result)}, last {result['window']} steps "
             f"scored, z > {result['threshold']:g}, {report.seeds_text(seeds)}\n"
             f"{report.config_line(result.get('config'), seeds=seeds)}")
    fig, axes = report.figure(1, 2, 11.5, 4.9, title)
    qx, ax = axes[0]
    if sweep == "duty":
        x = np.asarray([p["duty"] for p in result["points"]], float)
    else:
        x = np.asarray(result.get("strengths") or result["stds"], float)

    def curve(axis, key, label, **kw):
        m = np.array([p[key]["mean"] for p in result["points"]], float)
        sd = np.array([p[key]["std"] for p in result["points"]], float)
        axis.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=label, **kw)

    curve(qx, "roc_auc", "ROC-AUC (influence z-scores)")
    curve(qx, "recall", f"recall, influence rule (z > {result['threshold']:g})")
    curve(qx, "combined_recall", "recall, combined detector (+ update norms)", ls="--")
    curve(qx, "precision", "precision, influence rule", ls=":")
    qx.set(xscale="log", xlabel=xlabel, ylabel="edge-level score", ylim=(-0.03, 1.05),
           title="detection quality")
    qx.legend(fontsize=7, loc="best")
    curve(ax, "honest_accuracy", "honest nodes' mean test accuracy")
    ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy",
           title="what the attacker costs the honest nodes")
    ax.legend(fontsize=7, loc="best")
    ticks = curve_ticks(result)
    for axis in (qx, ax):  # the measured strengths as the ticks, no log-scale minor labels
        axis.set_xticks(x, ticks)
        axis.minorticks_off()
        if len(x) == 1:  # one point: a log axis needs a span around it
            axis.set_xlim(x[0] / 2, x[0] * 2)
    return report.save_figure(fig, path)


def intermittent_text(result: dict, lead: str = "") -> str:
    """``"intermittent: on 1 / off 3 steps (duty 0.25)"`` after ``lead``, or ``""`` for an
    attacker attacking every step (and results written before intermittent attacks)."""
    if not result.get("off"):
        return ""
    return (f"{lead}intermittent: on {result['on']} / off {result['off']} steps "
            f"(duty {result['duty']:.3g})")


def detection_table(result: dict) -> object:
    """One row per seed, then the mean and standard deviation over seeds (if several)."""
    from dicejax import report

    seeds = result["seeds"]
    extra = {"gaussian_noise": f", std {result.get('std')}",
             "label_flip": f", target {result.get('target')}",
             "label_noise": f", fraction {result.get('fraction')} ({result.get('mislabelled')} "
                            f"labels per batch)"}.get(result["attack"], "")
    extra += intermittent_text(result, ", ")
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
             "label_flip": f" (to class {result.get('target')})",
             "label_noise": f" (fraction {result.get('fraction')}: {result.get('mislabelled')} "
                            f"labels per batch)"}.get(result["attack"], "")
    extra += intermittent_text(result, ", ")
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
