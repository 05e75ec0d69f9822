"""``dicejax contribute``: per-node contribution shares over a run with corrupted nodes.

Some nodes train on label-permuted batches (:func:`dicejax.attacks.label_permutation`), some
free-ride (``update_scale = 0``, :func:`dicejax.attacks.free_rider`); everyone else is honest.
The ledger (:func:`dicejax.apps.contribution.contributions`) should give both kinds lower
shares than the honest nodes. With ``--exact`` the first-order estimate is set beside what it
estimates: the exact leave-one-out effects (:func:`dicejax.apps.contribution.leave_one_out`,
``n + 1`` re-runs) and sampled node Shapley values
(:func:`dicejax.apps.contribution.shapley`), with their correlations and costs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicejax.commands import add_command, metadata, options, prepare, save_results

#: Kept for callers of the first CLI.
_nodes = options.node_ids

#: Colours and legend labels of the nodes' roles in both figures.
ROLE_COLOURS = {"honest": "tab:blue", "permuted": "tab:red", "free_rider": "tab:orange"}
ROLE_LABELS = {"honest": "honest", "permuted": "label-permuted", "free_rider": "free-rider"}
ROLE_MARKERS = {"honest": "o", "permuted": "X", "free_rider": "s"}


def contribution_run(config: Any, permuted: Sequence[int] = (),
                     free_riders: Sequence[int] = (), proximal: bool = True,
                     dtype: Any = None, *,
                     progress: Callable[[str, int, int], None] | None = None,
                     checkpoint_dir: str | Path | None = None, exact: bool = False,
                     permutations: int = 16) -> dict[str, Any]:
    """Trains with corrupted nodes and computes every node's contribution.

    Args:
      config: the run (a ``RunConfig``; the whole trajectory is recorded — memory grows with
        ``steps``: keep it modest).
      permuted: nodes whose labels are permuted within every batch.
      free_riders: nodes whose local updates are gated to zero.
      proximal: also compute the reciprocity summaries.
      dtype: optional float dtype.
      progress: ``progress(phase, done, total)``: ``("train", steps done, T)`` after each
        chunk, ``("attribute", 0 or 1, 1)`` around the reverse pass, with ``exact``
        ``("exact", 0..2, 2)`` around leave-one-out and Shapley.
      checkpoint_dir: keep the finished training trajectory and the result there; a second
        call with the same folder skips what is stored (training is one stage: a run
        interrupted during training trains again).
      exact: also compute the exact leave-one-out effects (``mode="data"``: the node's
        updates gated to 0 at every step, it still relays) and Shapley values
        (``permutations`` antithetic permutations, seeded by ``config.seed``).
      permutations: Shapley permutations (exact values when ``n! <= permutations``).

    Returns:
      A dict: ``roles`` ``[n]`` (``honest`` | ``permuted`` | ``free_rider``), ``contribution``,
      ``shares``, ``clipped_shares`` ``[n]``, ``per_step`` ``[T, n]``, optionally
      ``neighbourhood_factor``, ``given``, ``received`` ``[n]``; ``honest_mean_share``,
      ``honest_min_share``, ``permuted_shares``, ``free_rider_shares``;
      ``accuracy`` ``[n]``; ``wall_seconds``. With ``exact`` also ``influence`` ``[n]`` (the
      estimate, ``−contribution``), ``leave_one_out`` ``[n]`` and
      ``leave_one_out_observers`` ``[n, n]`` (``[k, j]``: observer ``k``, removed ``j``),
      ``shapley``, ``shapley_stderr`` ``[n]``, ``shapley_permutations``, ``shapley_exact``
      (all in nats, negative = helped), ``agreement`` (Pearson and Spearman of the estimate
      against ``leave_one_out`` and ``shapley``), ``estimate_seconds``,
      ``leave_one_out_seconds``, ``shapley_seconds``.
    """
    import dataclasses
    import time

    import jax
    import numpy as np

    from dicejax import attacks
    from dicejax.apps.contribution import contributions
    from dicejax.experiments.anomaly import AttackedSource
    from dicejax.experiments.common import ResultStore, build
    from dicejax.simulate import evaluate_nodes, final_state, simulate

    tic = time.perf_counter()
    T, n = config.steps, config.nodes
    permuted, free_riders = list(permuted), list(free_riders)
    if set(permuted) & set(free_riders):
        raise ValueError("permuted and free_riders: a node cannot be both")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations: must be a positive integer, got {permutations!r}")
    say = progress or (lambda phase, done, total: None)
    store = None
    if checkpoint_dir is not None:
        identity = {
            "experiment": "contribution", "config": dataclasses.asdict(config),
            "permuted": permuted, "free_riders": free_riders, "proximal": proximal,
            "dtype": None if dtype is None else np.dtype(dtype).name}
        if exact:  # runs without --exact keep the folders of earlier versions
            identity.update(exact=True, permutations=permutations)
        store = ResultStore(checkpoint_dir, identity)
        done = store.get("result")
        if done is not None:
            say("train", T, T)
            say("attribute", 1, 1)
            return done
    setup = build(config, dtype)
    source = setup.source
    if permuted:  # the same draws as corrupting the whole run at once
        draws = np.asarray(jax.random.uniform(jax.random.PRNGKey(config.seed),
                                              (T, n, config.batch)))
        source = AttackedSource(source, "label_permutation", tuple(permuted), config.seed,
                                draws=draws)
    dt = jax.tree.leaves(setup.params)[0].dtype
    scale = attacks.free_rider(T, n, free_riders, dtype=dt) if free_riders else None
    traj = None if store is None else store.get("trajectory")
    if traj is not None:
        traj = traj.replace(simulator=traj.simulator.replace(loss_fn=setup.loss_fn,
                                                             optimizer=setup.optimizer))
        say("train", T, T)
    else:
        chunk = setup.chunk_steps
        traj = simulate(setup.loss_fn, setup.params,
                        (source(lo, min(lo + chunk, T)) for lo in range(0, T, chunk)),
                        setup.topology, setup.optimizer, record=True, update_scale=scale,
                        callback=lambda state, d: say("train", d, T))
        if store is not None:
            # the loss and optimizer are closures (not picklable): rebuilt from the setup
            store.put("trajectory", traj.replace(simulator=traj.simulator.replace(
                loss_fn=None, optimizer=None)))
    say("attribute", 0, 1)
    tic_estimate = time.perf_counter()
    led = contributions(setup.loss_fn, traj, setup.probe, proximal=proximal)
    jax.block_until_ready(led)
    estimate_seconds = time.perf_counter() - tic_estimate
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
    say("attribute", 1, 1)
    if exact:
        result.update(exact_comparison(setup.loss_fn, traj, setup.probe, led.influence,
                                       permutations, config.seed, say))
        result["estimate_seconds"] = estimate_seconds
    result["wall_seconds"] = time.perf_counter() - tic
    if store is not None:
        store.put("result", result)
    return result


def exact_comparison(loss_fn: Callable, traj: Any, probe: Any, influence: Any,
                     permutations: int, seed: int,
                     say: Callable[[str, int, int], None]) -> dict[str, Any]:
    """Leave-one-out and Shapley values of a recorded run beside the estimate ``influence``.

    Returns:
      The ``exact`` entries of :func:`contribution_run`'s result (except
      ``estimate_seconds``).
    """
    import time

    import jax
    import numpy as np

    from dicejax.apps.contribution import leave_one_out, shapley
    from dicejax.experiments.cascade import spearman

    say("exact", 0, 2)
    tic = time.perf_counter()
    loo = jax.block_until_ready(leave_one_out(loss_fn, traj, probe, observers=True))
    loo_seconds = time.perf_counter() - tic
    say("exact", 1, 2)
    tic = time.perf_counter()
    sv = shapley(loss_fn, traj, probe, num_permutations=permutations, seed=seed)
    shapley_seconds = time.perf_counter() - tic
    say("exact", 2, 2)
    est = np.asarray(influence, np.float64)

    def agree(exact_values):
        x = np.asarray(exact_values, np.float64)
        ok = est.std() > 0 and x.std() > 0
        return {"pearson": float(np.corrcoef(est, x)[0, 1]) if ok else float("nan"),
                "spearman": spearman(est, x) if est.size >= 2 else float("nan")}

    return {
        "influence": est,
        "leave_one_out": np.asarray(loo.values, np.float64),
        "leave_one_out_observers": np.asarray(loo.per_observer, np.float64),
        "shapley": np.asarray(sv.values, np.float64),
        "shapley_stderr": np.asarray(sv.stderr, np.float64),
        "shapley_permutations": int(sv.num_samples),
        "shapley_exact": bool(sv.exact),
        "agreement": {"leave_one_out": agree(loo.values), "shapley": agree(sv.values)},
        "leave_one_out_seconds": loo_seconds,
        "shapley_seconds": shapley_seconds,
    }


def register(subparsers, run_args: Callable[..., object],
             make_config: Callable[[argparse.Namespace], object]) -> None:
    """Adds ``dicejax contribute`` to the CLI's sub-parsers."""
    p = add_command(
        subparsers, "contribute",
        help="per-node contribution shares (label-permuted and free-riding nodes)",
        description="Train with some label-permuted and some free-riding nodes (recording the "
                    "run), then give every node its contribution: minus its summed "
                    "full-trajectory attribution (one reverse pass), normalised to shares. "
                    "Writes contribute.json and contribute.png.")
    out = run_args(p)
    options.add_checkpoint_arg(out if out is not None else p,
                               "the finished training run, then the result")
    g = p.add_argument_group("corrupted nodes")
    g.add_argument("--permuted", type=options.node_ids, default=[3], metavar="IDS",
                   help="nodes with label-permuted batches, e.g. 3 or 3,7 ('' for none) "
                        "(default: 3)")
    g.add_argument("--free-riders", type=options.node_ids, default=[5], metavar="IDS",
                   help="free-riding nodes (update scale 0: they only relay), e.g. 5 ('' for "
                        "none) (default: 5)")
    g.add_argument("--no-proximal", action="store_true",
                   help="skip the proximal-influence reciprocity summaries (given, received, "
                        "neighbourhood factor)")
    x = p.add_argument_group("exact counterfactuals")
    x.add_argument("--exact", action="store_true",
                   help="also compute what the estimate stands for: every node's exact "
                        "leave-one-out effect (n + 1 re-runs of the whole run, the node's "
                        "updates gated to 0, it still relays) and its Shapley value "
                        "(sampled permutations, n - 1 re-runs each); writes "
                        "contribute_exact.png")
    x.add_argument("--permutations", type=options.positive_int, default=16, metavar="M",
                   help="Shapley permutations with --exact (antithetic pairs; exact values "
                        "when n! <= M) (default: 16)")
    p.set_defaults(fn=lambda a: run(a, make_config))


def check(a: argparse.Namespace) -> None:
    """Corrupted nodes within ``[0, nodes)``, no node both, at least one honest node."""
    options.check_nodes(a.permuted, a.nodes, "--permuted")
    options.check_nodes(a.free_riders, a.nodes, "--free-riders")
    both = sorted(set(a.permuted) & set(a.free_riders))
    if both:
        raise options.UsageError(f"--free-riders: node(s) {both} are also in --permuted; a node "
                                 "cannot be both")
    if len(set(a.permuted) | set(a.free_riders)) >= a.nodes:
        raise options.UsageError("--permuted, --free-riders: at least one node must be honest")


def run(a: argparse.Namespace, make_config: Callable[[argparse.Namespace], object]) -> int:
    """The command's handler."""
    out = prepare(a, [check])
    config = make_config(a)
    from dicejax import report
    from dicejax.commands.progress import Tracker

    with Tracker(report.console, resumable=a.checkpoint_dir is not None) as t:
        bars = {"train": t.bar("training (recorded)", config.steps, "steps"),
                "attribute": t.bar("attribution (one reverse pass)", 1, "passes",
                                   noun="pass")}
        if a.exact:
            bars["exact"] = t.bar("exact re-runs (leave-one-out, Shapley)", 2, "parts")
        result = contribution_run(config, a.permuted, a.free_riders, not a.no_proximal,
                                  progress=lambda phase, done, total: t.update(bars[phase],
                                                                               done),
                                  checkpoint_dir=a.checkpoint_dir, exact=a.exact,
                                  permutations=a.permutations)
    report.console.print(contribution_table(result))
    report.console.print(
        f"honest share mean {result['honest_mean_share']:.4f} (min "
        f"{result['honest_min_share']:.4f}); permuted {_fmt(result['permuted_shares'])}; "
        f"free-riders {_fmt(result['free_rider_shares'])}; {result['wall_seconds']:.1f} s")
    figures = {"contribute.png": contribution_figure}
    if "leave_one_out" in result:
        g = result["agreement"]
        report.console.print(
            f"estimate vs leave-one-out: Pearson {g['leave_one_out']['pearson']:.3f}, "
            f"Spearman {g['leave_one_out']['spearman']:.3f}; vs Shapley: Pearson "
            f"{g['shapley']['pearson']:.3f}, Spearman {g['shapley']['spearman']:.3f}. "
            f"Time: estimate {result['estimate_seconds']:.1f} s, leave-one-out "
            f"{result['leave_one_out_seconds']:.1f} s, Shapley "
            f"{result['shapley_seconds']:.1f} s ({result['shapley_permutations']} "
            "permutations" + (", exact" if result["shapley_exact"] else "") + ")")
        figures["contribute_exact.png"] = exact_figure
    return save_results(out, "contribute", result, figures, metadata(a))


def _fmt(values) -> str:
    import numpy as np

    return "[" + ", ".join(f"{v:.4f}" for v in np.asarray(values).ravel()) + "]"


def contribution_table(result: dict) -> object:
    """One row per node: role, contribution, signed and clipped shares, reciprocity."""
    import numpy as np

    from dicejax import report

    has_factor = "neighbourhood_factor" in result
    has_exact = "leave_one_out" in result
    caption = ("contribution c_j = −Σ_t A[t, j]: minus node j's first-order effect on the "
               "final weighted probe loss, summed over its local updates (nats; > 0: it "
               "helped). share = c_j / Σ|c| (signed); clipped = max(c_j, 0) / Σ max(c, 0). "
               "accuracy: the node's final test accuracy.")
    if has_exact:
        caption += (" exact, in the same sign (> 0: helped): leave-one-out = "
                    "−(L_full − L_without j), the final weighted probe loss without node j's "
                    "updates (gated to 0 at every step, it still relays) minus with them "
                    "(nats); Shapley = minus node j's Shapley value of the game v(S) = final "
                    "probe loss when only the nodes in S train, ± its standard error "
                    "(nats).")
    if has_factor:
        caption += (" nbhd factor: the neighbourhood factor Σ_k P[k, j] / Σ_k P[j, k] of the "
                    "proximal influence summed over the run: the loss change node j's "
                    "updates cause at its out-neighbours over the change its in-neighbours' "
                    "updates cause at j (a ratio, no unit). When both sums are negative "
                    "(helpful), > 1 means j helps its neighbours more than they help it; a "
                    "negative factor means one direction helps and the other harms; 0 for a "
                    "free-rider (no updates of its own); — where j receives no influence.")
    t = report.table(
        "Contribution ledger — " + report.config_line(result.get("config")), caption=caption)
    cols = ["node", "role", "contribution (nats)", "share", "clipped", "accuracy"]
    if has_exact:
        cols += ["leave-one-out (nats)", "Shapley (nats)"]
    if has_factor:
        cols.append("nbhd factor")
    for name in cols:
        t.add_column(name, justify="right")
    for j, role in enumerate(result["roles"]):
        row = [str(j), role, f"{result['contribution'][j]:.3e}", f"{result['shares'][j]:.4f}",
               f"{result['clipped_shares'][j]:.4f}", f"{result['accuracy'][j]:.4f}"]
        if has_exact:
            row += [f"{0.0 - result['leave_one_out'][j]:.3e}",  # 0.0 − x: no "−0"
                    f"{0.0 - result['shapley'][j]:.3e} ± "
                    f"{result['shapley_stderr'][j]:.1e}"]
        if has_factor:
            f = result["neighbourhood_factor"][j]
            row.append("—" if f is None or not np.isfinite(f) else f"{f:.3f}")
        t.add_row(*row)
    return t


def contribution_figure(result: dict, path: Path) -> Path:
    """Signed shares per node coloured by role, and the cumulative contribution over steps."""
    import numpy as np
    from matplotlib.patches import Patch

    from dicejax import report

    colours, labels = ROLE_COLOURS, ROLE_LABELS
    roles = result["roles"]
    fig, axes = report.figure(1, 2, 12, 4.6, "dicejax contribute — "
                              + report.config_line(result.get("config")))
    bx, cx = axes[0]
    shares = np.asarray(result["shares"], np.float64)
    bx.bar(np.arange(len(roles)), shares, color=[colours[r] for r in roles])
    bx.axhline(0, color="k", lw=0.8)
    zero = [j for j, v in enumerate(shares) if v == 0]  # e.g. free-riders: mark the bar
    bx.scatter(zero, np.zeros(len(zero)), marker="D", s=30, zorder=3,
               color=[colours[roles[j]] for j in zero], edgecolors="k", linewidths=0.5)
    bx.set_xticks(np.arange(len(roles)))
    bx.tick_params(axis="x", labelsize=7 if len(roles) > 20 else 9)
    bx.set(xlabel="node", ylabel=r"signed share $c_j / \sum_k |c_k|$",
           title="contribution shares (diamond: exactly 0)" if zero else "contribution shares")
    present = [r for r in colours if r in roles]
    bx.legend(handles=[Patch(color=colours[r], label=labels[r]) for r in present], fontsize=8)
    cum = -np.cumsum(np.asarray(result["per_step"], np.float64), axis=0)
    for j, role in enumerate(roles):
        cx.plot(np.arange(1, cum.shape[0] + 1), cum[:, j], color=colours[role],
                alpha=0.9 if role != "honest" else 0.4, lw=1.6 if role != "honest" else 1,
                label=labels[role] if role not in roles[:j] else None)
    cx.axhline(0, color="k", lw=0.6)
    cx.set(xlabel="step t", ylabel=r"cumulative contribution $-\sum_{s \leq t} A[s, j]$ (nats)",
           title="contribution over the run (one line per node)")
    cx.legend(fontsize=8)
    return report.save_figure(fig, path)


def exact_figure(result: dict, path: Path) -> Path:
    """The first-order estimate against leave-one-out and against Shapley, one point per
    node, marked by role (all as contributions: > 0 = helped, nats)."""
    import numpy as np

    from dicejax import report

    roles = result["roles"]
    est = -np.asarray(result["influence"], np.float64)
    fig, axes = report.figure(1, 2, 11, 4.8, "dicejax contribute --exact — "
                              + report.config_line(result.get("config")))
    panels = [
        ("leave_one_out", None, "leave-one-out", r"exact $-(L_{full} - L_{-j})$ (nats)"),
        ("shapley", "shapley_stderr",
         f"Shapley ({result['shapley_permutations']} permutations"
         + (", exact)" if result.get("shapley_exact") else ", ±1 s.e.)"),
         r"minus Shapley value $-\phi_j$ (nats)"),
    ]
    for ax, (key, err, name, xlabel) in zip(axes[0], panels, strict=True):
        x = -np.asarray(result[key], np.float64)
        xerr = None if err is None else np.asarray(result[err], np.float64)
        for role in ROLE_COLOURS:
            idx = [j for j, r in enumerate(roles) if r == role]
            if not idx:
                continue
            ax.errorbar(x[idx], est[idx], xerr=None if xerr is None else xerr[idx],
                        fmt=ROLE_MARKERS[role], color=ROLE_COLOURS[role], ms=6,
                        mec="k", mew=0.5, elinewidth=0.8, capsize=2, ls="none",
                        label=ROLE_LABELS[role])
        both = np.concatenate([x, est])
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1e-12
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
        ax.axhline(0, color="0.7", lw=0.6)
        ax.axvline(0, color="0.7", lw=0.6)
        g = result["agreement"][key]
        ax.set(xlabel=xlabel, ylabel=r"first-order estimate $-\sum_t A[t, j]$ (nats)",
               title=f"estimate vs {name}\nPearson {g['pearson']:.3f}, Spearman "
                     f"{g['spearman']:.3f}")
        ax.legend(fontsize=8, loc="best")
    return report.save_figure(fig, path)
