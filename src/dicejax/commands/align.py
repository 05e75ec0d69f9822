"""``dicejax align``: DICE-GT against every DICE-E estimator, Pearson and Spearman per hop."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dicejax.commands import add_command, metadata, options, prepare, save_results


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax align`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "align", help="DICE-GT vs DICE-E correlations for r = 1..hops",
        description="Train (recording only the windows that are scored), score --num-steps "
                    "source steps x every node with the exact counterfactual DICE-GT and the "
                    "four DICE-E estimators, and print Pearson and Spearman correlations per "
                    "hop count r and per network horizon h. Writes align.json and one scatter "
                    "figure per estimator.")
    out = run_args(p, steps=100)
    options.add_checkpoint_arg(out if out is not None else p,
                               "the training checkpoints and every scored step")
    g = p.add_argument_group("alignment")
    g.add_argument("--hops", type=options.positive_int, default=3, metavar="R",
                   help="largest number of hops r; every r = 1..R is reported")
    g.add_argument("--num-steps", type=options.positive_int, default=20, metavar="S",
                   help="source steps scored, evenly spaced over [0, T - R] (at most "
                        "T - R + 1)")
    g.add_argument("--float32", action="store_true",
                   help="run in float32 (default: float64, so that far-hop ground truths are "
                        "not lost in rounding)")
    g.add_argument("--batch-size", type=options.positive_int, default=None, metavar="K",
                   help="sources re-run at a time (default: as many as half the free memory "
                        "holds)")
    g.add_argument("--sources-per-step", type=options.positive_int, default=None, metavar="M",
                   help="sources scored at each step, sampled without replacement (default: "
                        "every node up to 64 nodes, 64 above)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """``--hops <= --steps``, ``--num-steps <= --steps - --hops + 1``."""
    if a.hops > a.steps:
        raise options.UsageError(f"--hops: {a.hops} exceeds --steps {a.steps}")
    if a.sources_per_step is not None and a.sources_per_step > a.nodes:
        raise options.UsageError(f"--sources-per-step: {a.sources_per_step} exceeds --nodes "
                                 f"{a.nodes}")
    most = a.steps - a.hops + 1
    if a.num_steps > most:
        raise options.UsageError(
            f"--num-steps: {a.num_steps} exceeds the {most} source steps that --steps "
            f"{a.steps} and --hops {a.hops} allow (--steps - --hops + 1)")


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a, [check])
    config = make_config(a)
    import jax
    import jax.numpy as jnp

    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.alignment import alignment

    if a.float32:
        dtype = jnp.float32
    else:
        jax.config.update("jax_enable_x64", True)
        dtype = jnp.float64
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        bars = {"train": t.bar("training", config.steps, "steps"),
                "score": t.bar("scoring", a.num_steps, "source steps", noun="scored step")}

        def progress(phase, done, total):
            if phase == "score" and done == 1:
                t.reset(bars["score"], total=total)
            t.update(bars[phase], done)

        result = alignment(config, hops=a.hops, num_steps=a.num_steps, dtype=dtype,
                           batch_size=a.batch_size, callback=progress,
                           checkpoint_dir=a.checkpoint_dir,
                           sources_per_step=a.sources_per_step)
    report.console.print(report.alignment_table(result))
    d = result["direct_taylor_vs_exact"]
    resumed = (f" ({result['resumed_scores']} scored steps restored from "
               f"{a.checkpoint_dir})" if result["resumed_scores"] else "")
    report.console.print(
        f"direct term, Taylor vs exact: Pearson {d['pearson']:.4f}; mean test accuracy "
        f"{result['train']['mean_accuracy']:.4f}; scoring took "
        f"{result['scoring_seconds']:.1f} s{resumed}")
    figures = {f"align_{report.ESTIMATOR_FILES[name]}.png":
               (lambda r, path, name=name: report.alignment_figure(r, path, name))
               for name in report.ESTIMATOR_FILES}
    return save_results(out, "align", result, figures, metadata(a))
