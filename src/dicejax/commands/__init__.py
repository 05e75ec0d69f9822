"""Sub-commands of the ``dicejax`` CLI, one module each.

Each module defines ``register(subparsers, run_args, make_config)``, which adds one
sub-command whose handler checks its options (:func:`prepare`), calls an experiment function
with a progress bar (:mod:`dicejax.commands.progress`), prints a table and saves JSON and
figures (:func:`save_results`). Modules import jax, matplotlib and the experiments only inside
their handlers, so that ``dicejax --help`` and option errors come back at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dicejax.commands import options

MODULES: tuple[str, ...] = ("train", "align", "detect", "rewire", "contribute", "cascade",
                            "topo_opt")


def add_command(subparsers: Any, name: str, help: str, description: str | None = None,
                ) -> argparse.ArgumentParser:
    """A sub-command parser with the shared help style (every option shows its default)."""
    p = subparsers.add_parser(name, help=help, description=description or help,
                              formatter_class=options.HelpFormatter,
                              epilog="exit codes: " + "; ".join(
                                  f"{code} {text}" for code, text in options.EXIT_CODES.items()))
    p.set_defaults(parser=p)
    return p


def prepare(a: argparse.Namespace, checks: Iterable[Callable[[argparse.Namespace], None]] = (),
            ) -> Path:
    """Everything checked before any work: options, their relations, the folders.

    Args:
      a: the parsed options.
      checks: the command's own checks (each raises :class:`options.UsageError`).

    Returns:
      The output folder (created, writable).
    """
    options.check_run(a)
    for check in checks:
        check(a)
    out = options.prepare_folder(a.out, "--out")
    if getattr(a, "checkpoint_dir", None):
        options.prepare_folder(a.checkpoint_dir, "--checkpoint-dir")
    return out


def metadata(a: argparse.Namespace, seed: int | None = None) -> dict:
    """The result's provenance (:func:`dicejax.experiments.common.run_metadata`)."""
    from dicejax.experiments.common import run_metadata

    return run_metadata(getattr(a, "argv", None), getattr(a, "seed", None) if seed is None
                        else seed)


def save_results(out: Path, name: str, result: dict,
                 figures: Mapping[str, Callable[[dict, Path], Any]],
                 meta: dict | None = None) -> int:
    """Writes ``out/<name>.json`` (atomically) and every figure, prints what was saved.

    Args:
      out: output folder (``pathlib.Path``).
      name: stem of the JSON file.
      result: the experiment's JSON-ready dict.
      figures: ``{file name: fn}``; ``fn(result, path)`` draws and saves one figure.
      meta: provenance put first in the JSON under ``"meta"`` (:func:`metadata`).

    Returns:
      ``0``, the command's exit status.
    """
    from dicejax import report
    from dicejax.experiments.common import save_json

    if meta is not None:
        result = {"meta": meta, **result}
    path = save_json(Path(out) / f"{name}.json", result)
    saved = [str(fn(result, Path(out) / file)) for file, fn in figures.items()]
    report.console.print(f"saved {path} and {', '.join(saved)}")
    return 0
