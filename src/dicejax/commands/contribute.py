"""``dicejax contribute``: per-node contribution shares over a run with corrupted nodes.

Some nodes train on label-permuted batches (:func:`dicejax.attacks.label_permutation`), some
free-ride (``update_scale = 0``, :func:`dicejax.attacks.free_rider`); everyone else is honest.
The ledger (:func:`dicejax.apps.contribution.contributions`) should give both kinds lower
shares than the honest nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from dicejax import attacks, report
from dicejax.apps.contribution import contributions
from dicejax.commands import save_results
from dicejax.experiments.common import RunConfig, build
from dicejax.simulate import evaluate_nodes, final_state, simulate


def _nodes(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node ids like 3,17, got {text!r}") from None


def contribution_run(config: RunConfig, permuted: Sequence[int] = (),
                     free_riders: Sequence[int] = (), proximal: bool = True,
                     dtype: Any = None) -> dict[str, Any]:
    """Trains with corrupted nodes and computes every node's contribution.

    Args:
      config: the run (the whole trajectory is recorded: keep ``steps`` modest).
      permuted: nodes whose labels are permuted within every batch.
      free_riders: nodes whose local updates are gated to zero.
      proximal: also compute the reciprocity summaries.
      dtype: optional float dtype.

    Returns:
      A dict: ``roles`` ``[n]`` (``honest`` | ``permuted`` | ``free_rider``), ``contribution``,
      ``shares``, ``clipped_shares`` ``[n]``, ``per_step`` ``[T, n]``, optionally
      ``neighbourhood_factor``, ``given``, ``received`` ``[n]``; ``honest_mean_share``,
      ``honest_min_share``, ``permuted_shares``, ``free_rider_shares``;
      ``accuracy`` ``[n]``; ``wall_seconds``.
    """
    tic = time.perf_counter()
    setup = build(config, dtype)
    T, n = config.steps, config.nodes
    permuted, free_riders = list(permuted), list(free_riders)
    if set(permuted) & set(free_riders):
        raise ValueError("permuted and free_riders: a node cannot be both")
    batches = setup.batches
    if permuted:
        mask = attacks.attack_mask(T, n, permuted)
        batches = jax.jit(attacks.label_permutation())(batches, mask,
                                                       jax.random.PRNGKey(config.seed))
    dt = jax.tree.leaves(setup.params)[0].dtype
    scale = attacks.free_rider(T, n, free_riders, dtype=dt) if free_riders else None
    traj = simulate(setup.loss_fn, setup.params, batches, setup.topology, setup.optimizer,
                    record=True, update_scale=scale)
    led = contributions(setup.loss_fn, traj, setup.probe, proximal=proximal)
    roles = ["honest"] * n
    for j in permuted:
        roles[j] = "permuted"
    for j in free_riders:
        roles[j] = "free_rider"
    honest = [j for j in range(n) if roles[j] == "honest"]
    sh = np.asarray(led.shares, np.float64)
    acc = evaluate_nodes(setup.eval_fn, final_state(traj).params, setup.test)
    result: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "roles": roles,
        "permuted": permuted,
        "free_riders": free_riders,
        "contribution": np.asarray(led.contribution, np.float64),
        "shares": sh,
        "clipped_shares": np.asarray(led.clipped_shares, np.float64),
        "per_step": np.asarray(led.per_step, np.float64),
        "honest_mean_share": float(sh[honest].mean()) if honest else float("nan"),
        "honest_min_share": float(sh[honest].min()) if honest else float("nan"),
        "permuted_shares": sh[permuted],
        "free_rider_shares": sh[free_riders],
        "accuracy": np.asarray(acc["accuracy"], np.float64),
    }
    if led.reciprocity is not None:
        result["neighbourhood_factor"] = np.asarray(led.reciprocity.factor, np.float64)
        result["given"] = np.asarray(led.reciprocity.given, np.float64)
        result["received"] = np.asarray(led.reciprocity.received, np.float64)
    result["wall_seconds"] = time.perf_counter() - tic
    return result


def register(subparsers, run_args: Callable[[argparse.ArgumentParser], None],
             make_config: Callable[[argparse.Namespace], RunConfig]) -> None:
    """Adds ``dicejax contribute`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "contribute", help="per-node contribution shares (label-permuted and free-riding nodes)")
    run_args(p)
    p.add_argument("--permuted", type=_nodes, default=[3],
                   help="nodes with label-permuted batches, e.g. 3 or 3,7 (default 3)")
    p.add_argument("--free-riders", type=_nodes, default=[5],
                   help="free-riding nodes (update scale 0), e.g. 5 (default 5)")
    p.add_argument("--no-proximal", action="store_true",
                   help="skip the proximal-influence reciprocity summaries")
    p.set_defaults(fn=lambda a: _run(a, make_config))


def _run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], RunConfig]) -> int:
    config = make_config(a)
    out = Path(a.out)
    with report.console.status("training and attributing ..."):
        result = contribution_run(config, a.permuted, a.free_riders, not a.no_proximal)
    report.console.print(contribution_table(result))
    report.console.print(
        f"honest share mean {result['honest_mean_share']:.4f} (min "
        f"{result['honest_min_share']:.4f}); permuted {_fmt(result['permuted_shares'])}; "
        f"free-riders {_fmt(result['free_rider_shares'])}; {result['wall_seconds']:.1f} s")
    return save_results(out, "contribute", result, {"contribute.png": contribution_figure})


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in np.asarray(values).ravel()) + "]"


def contribution_table(result: dict) -> Table:
    """One row per node: role, contribution, signed and clipped shares, reciprocity."""
    table = Table(title="Contribution ledger (contribution = −Σ_t influence; > 0 helpful)")
    cols = ["node", "role", "contribution", "share", "clipped", "accuracy"]
    has_factor = "neighbourhood_factor" in result
    if has_factor:
        cols.append("nbhd factor")
    for name in cols:
        table.add_column(name, justify="right")
    for j, role in enumerate(result["roles"]):
        row = [str(j), role, f"{result['contribution'][j]:.3e}", f"{result['shares'][j]:.4f}",
               f"{result['clipped_shares'][j]:.4f}", f"{result['accuracy'][j]:.4f}"]
        if has_factor:
            row.append(f"{result['neighbourhood_factor'][j]:.3f}")
        table.add_row(*row)
    table.caption = "share = c / Σ|c| (signed); clipped = max(c, 0) / Σ max(c, 0)"
    return table


def contribution_figure(result: dict, path: Path) -> Path:
    """Signed shares per node coloured by role, and the cumulative contribution over steps."""
    colours = {"honest": "tab:blue", "permuted": "tab:red", "free_rider": "tab:orange"}
    roles = result["roles"]
    fig, (bx, cx) = plt.subplots(1, 2, figsize=(11, 4))
    shares = np.asarray(result["shares"])
    bx.bar(np.arange(len(roles)), shares, color=[colours[r] for r in roles])
    bx.axhline(0, color="k", lw=0.8)
    bx.set(xlabel="node", ylabel="signed share c_j / Σ|c|", title="contribution shares")
    cum = -np.cumsum(np.asarray(result["per_step"]), axis=0)
    for j, role in enumerate(roles):
        cx.plot(cum[:, j], color=colours[role], alpha=0.9 if role != "honest" else 0.4,
                label=role if role not in roles[:j] else None)
    cx.set(xlabel="step", ylabel="cumulative contribution", title="contribution over the run")
    cx.legend(fontsize=8)
    return report.save_figure(fig, path)
