"""Sub-commands of the ``dicejax`` CLI beyond ``train`` and ``align``.

Each module here defines ``register(subparsers)``, which adds one sub-command whose handler
calls an experiment function, prints a table and saves JSON and figures.
"""

MODULES: tuple[str, ...] = ("cascade", "contribute", "detect", "rewire", "topo_opt")


def save_results(out, name: str, result: dict, figures) -> int:
    """Writes ``out/<name>.json`` and every figure, prints what was saved.

    Args:
      out: output folder (``pathlib.Path``).
      name: stem of the JSON file.
      result: the experiment's JSON-ready dict.
      figures: ``{file name: fn}``; ``fn(result, path)`` draws and saves one figure.

    Returns:
      ``0``, the command's exit status.
    """
    from dicejax import report
    from dicejax.experiments.common import save_json

    path = save_json(out / f"{name}.json", result)
    saved = [str(fn(result, out / file)) for file, fn in figures.items()]
    report.console.print(f"saved {path} and {', '.join(saved)}")
    return 0
