"""The ``dicejax`` command: ``dicejax train``, ``dicejax align``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dicejax import report
from dicejax.commands import MODULES, save_results
from dicejax.experiments.common import RunConfig, save_json


def _run_args(p: argparse.ArgumentParser, steps: int = 300) -> None:
    d = RunConfig()
    p.add_argument("--dataset", default=d.dataset,
                   help="digits (bundled, default) | fashion_mnist | mnist | cifar10")
    p.add_argument("--data-dir", default=None, help="directory of the data set's files")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--topology", default=d.topology,
                   help="ring | exponential | torus | grid | hypercube | complete | star | "
                        "erdos_renyi | random_regular | one_peer_exponential | a CSV path")
    p.add_argument("--model", default=d.model, help="mlp | cnn | resnet18")
    p.add_argument("--optimizer", default=d.optimizer, help="sgd | momentum | adam")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--partition", default=d.partition,
                   help="iid | dirichlet | shards | resample (the reference code's mode)")
    p.add_argument("--samples-per-node", type=int, default=None)
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--independent-init", action="store_true",
                   help="initialise every node independently (default: same init)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--test-size", type=int, default=d.test_size, help="0 = whole test split")
    p.add_argument("--probe-size", type=int, default=d.probe_size)
    p.add_argument("--out", default="results", help="output folder")


def _config(a: argparse.Namespace) -> RunConfig:
    return RunConfig(dataset=a.dataset, data_dir=a.data_dir, nodes=a.nodes,
                     topology=a.topology, model=a.model, optimizer=a.optimizer, lr=a.lr,
                     batch=a.batch, steps=a.steps, partition=a.partition,
                     samples_per_node=a.samples_per_node, alpha=a.alpha, seed=a.seed,
                     same_init=not a.independent_init, eval_every=a.eval_every,
                     test_size=a.test_size, probe_size=a.probe_size)


def cmd_train(a: argparse.Namespace) -> int:
    from dicejax.experiments.train import train

    config = _config(a)
    out = Path(a.out)
    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total} steps"), TimeElapsedColumn()]
    with Progress(*columns, console=report.console, transient=False) as bar:
        task = bar.add_task("train", total=config.steps)
        result = train(config, chunk_steps=max(1, config.steps // 20),
                       callback=lambda state, done: bar.update(task, completed=done),
                       checkpoint_dir=a.checkpoint_dir)
    s = result.summary
    report.console.print(report.accuracy_table(s))
    report.console.print(
        f"mean test accuracy {s['mean_accuracy']:.4f} (min {s['min_accuracy']:.4f}) after "
        f"{config.steps} steps; {s['node_steps_per_second']:.0f} node-steps/s")
    save_results(out, "train", s, {"train.png": report.training_figure})
    return 0


def cmd_align(a: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from dicejax.experiments.alignment import ESTIMATORS, alignment

    config = _config(a)
    out = Path(a.out)
    if a.float32:
        dtype = jnp.float32
    else:
        jax.config.update("jax_enable_x64", True)
        dtype = jnp.float64
    with report.console.status("training, then scoring (node, step) pairs ..."):
        result = alignment(config, hops=a.hops, num_steps=a.num_steps, dtype=dtype,
                           batch_size=a.batch_size)
    report.console.print(report.alignment_table(result))
    d = result["direct_taylor_vs_exact"]
    report.console.print(
        f"direct term, Taylor vs exact: Pearson {d['pearson']:.4f}; mean test accuracy "
        f"{result['train']['mean_accuracy']:.4f}; scoring took {result['scoring_seconds']:.1f} s")
    path = save_json(out / "align.json", result)
    figs = [report.alignment_figure(result, out / f"align_{i}.png", name)
            for i, name in enumerate(ESTIMATORS)]
    report.console.print(f"saved {path} and {len(figs)} figures in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dicejax", description="Decentralized learning simulation and DICE influence.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a decentralized network, report per-node accuracy")
    _run_args(p)
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint every chunk there; rerun the same command to resume")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("align", help="DICE-GT vs DICE-E correlations for r = 1..hops")
    _run_args(p, steps=100)
    p.add_argument("--hops", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=20, help="source steps to score")
    p.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sources re-run at a time (bounds memory; default all at once)")
    p.set_defaults(fn=cmd_align)
    for name in MODULES:
        importlib.import_module(f"dicejax.commands.{name}").register(sub, _run_args, _config)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        report.err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
