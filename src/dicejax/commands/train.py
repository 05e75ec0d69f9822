"""``dicejax train``: decentralized training, per-node accuracy, streamed and resumable."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dicejax.commands import add_command, metadata, options, prepare, save_results


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax train`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "train", help="train a decentralized network, report per-node accuracy",
        description="Train every node with its local optimizer and gossip over the graph "
                    "(adapt-then-combine). Batches are generated chunk by chunk, so memory does "
                    "not grow with --steps. Prints the per-node test accuracy and writes "
                    "train.json and train.png.")
    out = run_args(p)
    options.add_checkpoint_arg(out if out is not None else p, "after every chunk")
    p.add_argument("--chunk-steps", type=options.positive_int, default=None, metavar="S",
                   help="steps per chunk: batches generated at once, and one progress update "
                        "and checkpoint per chunk (default: a twentieth of the run, at most "
                        "64 MiB of batches)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def resume_point(directory: str | None, config: object) -> int:
    """The step a checkpointed run of ``config`` resumes from (0 without a checkpoint of it;
    a folder holding another run is refused later, by the run itself)."""
    if directory is None or not Path(directory).is_dir():
        return 0
    import dataclasses
    import json

    from dicejax.checkpoint import latest_step

    try:
        stored = json.loads((Path(directory) / "run.json").read_text()).get("config")
    except (OSError, ValueError):
        return 0
    if stored != json.loads(json.dumps(dataclasses.asdict(config))):
        return 0
    return min(latest_step(directory) or 0, config.steps)


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a)
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker
    from dicejax.experiments.train import train

    start = resume_point(a.checkpoint_dir, config)
    if start >= config.steps:
        report.console.print(f"{a.checkpoint_dir} holds the finished run ({config.steps} of "
                             f"{config.steps} steps): reporting it, nothing to train")
    elif start:
        report.console.print(f"resuming from step {start} of {config.steps} "
                             f"({a.checkpoint_dir})")
    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        bar = t.bar("training", total=config.steps, completed=start, unit="steps")
        result = train(config, chunk_steps=getattr(a, "chunk_steps", None),
                       callback=lambda state, done: t.update(bar, done),
                       checkpoint_dir=a.checkpoint_dir)
    s = result.summary
    report.console.print(report.accuracy_table(s))
    ran = config.steps - start
    if s["node_steps_per_second"] is not None:
        speed = (f"{s['node_steps_per_second']:.0f} node-steps/s (after the first chunk, "
                 f"compilation excluded)")
    elif ran:
        speed = "throughput not measured (fewer than two chunks ran)"
    else:
        speed = "no steps run"
    report.console.print(
        f"mean test accuracy {s['mean_accuracy']:.4f} (min {s['min_accuracy']:.4f}) after "
        f"{config.steps} steps; {speed}")
    return save_results(out, "train", s, {"train.png": report.training_figure}, metadata(a))
