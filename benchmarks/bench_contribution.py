"""Contribution estimates against what they estimate: leave-one-out and Shapley (issue 16).

Part ``agreement``: digits (or ``--dataset fashion_mnist``), 16-node exponential graph,
MLP, SGD lr 0.1, batch 16, float64, ``--steps`` recorded steps (the issue asks for 300; 150
by default on a 2-core machine), seeds ``--seeds``, four settings: ``iid``; ``dirichlet``
(Dirichlet(0.3) label split);
``permuted`` (IID, nodes 3, 7, 11 label-permuted); ``free_riders`` (IID, nodes 5, 13
free-ride). For each: the first-order estimate ``contributions(...).influence``, the exact
leave-one-out effects ``leave_one_out(mode="data")`` and sampled Shapley values
(``--permutations`` antithetic permutations), through ``dicejax contribute --exact``'s
:func:`~dicejax.commands.contribute.contribution_run`; Pearson and Spearman of the estimate
against each exact form (and of leave-one-out against Shapley), the ratio of the sums
``Σ estimate / Σ leave-one-out``, and the wall times (compilation included).

Part ``cost``: the same run at ``n`` = ``--cost-nodes`` with ``--cost-steps`` steps (float64):
seconds of the estimate (one reverse pass), of leave-one-out (``n + 1`` re-runs) and of one
Shapley round of two permutations (``2 (n − 1) + 2`` re-runs), each called twice (first:
with compilation; second: warm; above ``--warm-exact-up-to`` nodes the exact forms are
called once, compilation included). Above 64 nodes (digits' 1,347 train images are too few
for disjoint local sets of 16) every node's batches are drawn with replacement from the
whole train split.
``--extrapolate-above N``: above ``N`` nodes leave-one-out is timed on 8 coalition re-runs
(:func:`~dicejax.apps.contribution.coalition_values`) and scaled to ``n + 1`` re-runs, the
Shapley round to ``2 (n − 1) + 2`` (marked ``extrapolated_from_8_runs``).

Part ``curvature`` (issue 16 item 3, a candidate better estimate): with ``F(a)`` the final
probe objective when every update of node ``j`` is gated by ``a_j`` (``a = 1``: the run),
leave-one-out is ``F(1) − F(1 − e_j) = ∂_j F − ½ ∂_jj F + …``; the first-order estimate is
``∂_j F`` (one reverse pass). This part adds the exact second-order term (``n``
Hessian-vector products through the whole run, forward over reverse) and Hutchinson
estimates of the diagonal from ``K`` Rademacher probes (``K`` products), and reports their
Spearman against leave-one-out and the cost of each.

Usage::

    python benchmarks/bench_contribution.py                      # both parts
    python benchmarks/bench_contribution.py --part agreement --steps 300 --seeds 0,1,2,3,4
    python benchmarks/bench_contribution.py --part cost --cost-nodes 16,64,256 \
        --out benchmarks/results/bench_contribution_cost.json

JSON goes to ``benchmarks/results/bench_contribution.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from benchmarks.common import RESULTS_DIR, git_state, load_average, machine_info, write_json

SETTINGS = {
    "iid": {"partition": "iid", "permuted": [], "free_riders": []},
    "dirichlet": {"partition": "dirichlet", "permuted": [], "free_riders": []},
    "permuted": {"partition": "iid", "permuted": [3, 7, 11], "free_riders": []},
    "free_riders": {"partition": "iid", "permuted": [], "free_riders": [5, 13]},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("agreement", "cost", "both", "curvature"), default="both")
    p.add_argument("--probes", default="4,8,16", help="Hutchinson probe counts (curvature)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"),
                   help="data of the agreement and curvature parts (fashion_mnist: the "
                        "Debian package's IDX files)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--permutations", type=int, default=8)
    p.add_argument("--cost-nodes", default="16,64,256")
    p.add_argument("--cost-steps", type=int, default=50)
    p.add_argument("--extrapolate-above", type=int, default=64)
    p.add_argument("--warm-exact-up-to", type=int, default=16,
                   help="time the exact forms twice (compiled, then warm) up to this n, "
                        "once (compilation included) above")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_contribution.json"))
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="print the per-setting summary of earlier agreement results "
                        "(one or more JSON files) and exit")
    return p.parse_args(argv)


def correlations(x, y) -> dict:
    from dicejax.experiments.cascade import spearman

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = x.std() > 0 and y.std() > 0
    return {"pearson": float(np.corrcoef(x, y)[0, 1]) if ok else float("nan"),
            "spearman": spearman(x, y)}


PAIRS = (("estimate_vs_loo", "est~LOO"), ("estimate_vs_shapley", "est~Shapley"),
         ("loo_vs_shapley", "LOO~Shapley"))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, setting) over the seeds of the agreement rows: for each correlation of
    :data:`PAIRS` the mean, standard deviation and minimum of Pearson and Spearman; the mean
    ``Σ est / Σ LOO`` and the mean seconds of each form. Skipped rows are counted apart."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("dataset", "digits"), r["setting"], r["steps"]), []).append(r)
    out = []
    for (dataset, setting, steps), rs in groups.items():
        done = [r for r in rs if "skipped" not in r]
        row = {"dataset": dataset, "setting": setting, "steps": steps, "seeds": len(done),
               "skipped": len(rs) - len(done)}
        for key, _ in PAIRS:
            for stat in ("pearson", "spearman"):
                v = np.array([r[key][stat] for r in done], np.float64)
                row[f"{key}_{stat}"] = {"mean": float(np.mean(v)) if v.size else None,
                                        "sd": float(np.std(v, ddof=1)) if v.size > 1 else None,
                                        "min": float(np.min(v)) if v.size else None}
        for key in ("sum_ratio_estimate_over_loo", "estimate_seconds", "leave_one_out_seconds",
                    "shapley_seconds", "shapley_max_stderr"):
            v = [r[key] for r in done]
            row[key] = float(np.mean(v)) if v else None
        out.append(row)
    return out


def print_summary(summary: list[dict]) -> None:
    """The :func:`summarize` rows as a table (mean ± sd over seeds, minimum in brackets)."""
    from rich.console import Console
    from rich.table import Table

    def cell(d):
        if d["mean"] is None:
            return "-"
        sd = f"±{d['sd']:.2f}" if d["sd"] is not None else ""
        return f"{d['mean']:.2f}{sd} ({d['min']:.2f})"

    table = Table(title="Contribution estimate against leave-one-out and Shapley: "
                        "Spearman (S) / Pearson (P), mean ± sd over seeds (min)")
    for c in ("data", "setting", "T", "seeds", *(f"{lab} S" for _, lab in PAIRS),
              *(f"{lab} P" for _, lab in PAIRS), "Σest/ΣLOO", "s: est / LOO / Shapley"):
        table.add_column(c)
    for r in summary:
        secs = " / ".join("-" if r[k] is None else f"{r[k]:.0f}" for k in
                          ("estimate_seconds", "leave_one_out_seconds", "shapley_seconds"))
        ratio = "-" if r["sum_ratio_estimate_over_loo"] is None \
            else f"{r['sum_ratio_estimate_over_loo']:.2f}"
        table.add_row(r["dataset"], r["setting"], str(r["steps"]),
                      f"{r['seeds']}" + (f" +{r['skipped']} skipped" if r["skipped"] else ""),
                      *(cell(r[f"{k}_spearman"]) for k, _ in PAIRS),
                      *(cell(r[f"{k}_pearson"]) for k, _ in PAIRS), ratio, secs)
    Console(width=240).print(table)


def setting_config(args, setting: dict, seed: int):
    """The run of one (setting, seed) of the agreement and curvature parts: ``--dataset``,
    16-node exponential graph, MLP, SGD lr 0.1, batch 16, ``--steps`` steps."""
    from dicejax.experiments.common import RunConfig

    return RunConfig(dataset=args.dataset, nodes=16, topology="exponential", model="mlp",
                     lr=0.1, batch=16, steps=args.steps, partition=setting["partition"],
                     alpha=0.3, seed=seed, eval_every=0)


def agreement(args, done=lambda rows: None) -> list[dict]:
    from dicejax.commands.contribute import contribution_run

    rows = []
    for name in args.settings.split(","):
        s = SETTINGS[name]
        for seed in [int(v) for v in args.seeds.split(",")]:
            config = setting_config(args, s, seed)
            tic = time.perf_counter()
            try:
                r = contribution_run(config, s["permuted"], s["free_riders"], proximal=False,
                                     dtype=np.float64, exact=True,
                                     permutations=args.permutations)
            except ValueError as e:  # e.g. a Dirichlet split with a node below one batch
                rows.append({"dataset": args.dataset, "setting": name, "seed": seed,
                             "steps": args.steps, "skipped": str(e)})
                print(f"{name:12s} seed {seed}: skipped ({e})", flush=True)
                done(rows)
                continue
            est, loo, sv = r["influence"], r["leave_one_out"], r["shapley"]
            row = {
                "dataset": args.dataset, "setting": name, "seed": seed, "steps": args.steps,
                "estimate_vs_loo": r["agreement"]["leave_one_out"],
                "estimate_vs_shapley": r["agreement"]["shapley"],
                "loo_vs_shapley": correlations(loo, sv),
                "sum_ratio_estimate_over_loo": float(np.sum(est) / np.sum(loo)),
                "shapley_max_stderr": float(np.max(r["shapley_stderr"])),
                "shapley_permutations": r["shapley_permutations"],
                "estimate_seconds": r["estimate_seconds"],
                "leave_one_out_seconds": r["leave_one_out_seconds"],
                "shapley_seconds": r["shapley_seconds"],
                "total_seconds": time.perf_counter() - tic,
                "influence": est, "leave_one_out": loo, "shapley": sv,
                "shapley_stderr": r["shapley_stderr"],
            }
            rows.append(row)
            g, h, k = row["estimate_vs_loo"], row["estimate_vs_shapley"], row["loo_vs_shapley"]
            print(f"{name:12s} seed {seed}: est~LOO P {g['pearson']:.3f} S {g['spearman']:.3f}"
                  f" | est~Shapley P {h['pearson']:.3f} S {h['spearman']:.3f}"
                  f" | LOO~Shapley P {k['pearson']:.3f} S {k['spearman']:.3f}"
                  f" | Σest/ΣLOO {row['sum_ratio_estimate_over_loo']:.2f}"
                  f" | s.e. max {row['shapley_max_stderr']:.1e}"
                  f" | est {row['estimate_seconds']:.1f} s, LOO "
                  f"{row['leave_one_out_seconds']:.1f} s, Shapley {row['shapley_seconds']:.1f} s",
                  flush=True)
            done(rows)
    return rows


def curvature(args, done=lambda rows: None) -> list[dict]:
    """Second-order leave-one-out estimates against the exact effects (see the docstring)."""
    import jax.numpy as jnp

    from dicejax.apps.contribution import contributions, leave_one_out
    from dicejax.experiments.anomaly import AttackedSource
    from dicejax.experiments.common import build
    from dicejax.influence.rerun import probe_losses, probe_vars, rerun_simulator
    from dicejax.simulate import simulate
    from dicejax.simulator import Gate, run

    rows = []
    for name in args.settings.split(","):
        s = SETTINGS[name]
        for seed in [int(v) for v in args.seeds.split(",")]:
            T, n = args.steps, 16
            config = setting_config(args, s, seed)
            try:
                setup = build(config, np.float64)
            except ValueError as e:
                rows.append({"dataset": args.dataset, "setting": name, "seed": seed,
                             "skipped": str(e)})
                continue
            source = setup.source
            if s["permuted"]:  # as dicejax contribute corrupts them
                draws = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (T, n, 16)))
                source = AttackedSource(source, "label_permutation", tuple(s["permuted"]),
                                        seed, draws=draws)
            own = np.ones((T, n))
            own[:, s["free_riders"]] = 0.0
            traj = simulate(setup.loss_fn, setup.params, source(0, T), setup.topology,
                            setup.optimizer, record=True, update_scale=own)
            loss, probe = setup.loss_fn, setup.probe
            tic = time.perf_counter()
            loo = np.asarray(leave_one_out(loss, traj, probe))
            loo_s = time.perf_counter() - tic
            tic = time.perf_counter()
            est = np.asarray(contributions(loss, traj, probe).influence)
            est_s = time.perf_counter() - tic
            sim = rerun_simulator(loss, traj)
            q = jnp.full(n, 1.0 / n)
            base, state0 = jnp.asarray(own), traj.state_at(0)

            def objective(a, sim=sim, q=q, base=base, state0=state0, traj=traj, probe=probe):
                gate = Gate(base * a, (base != 0).astype(base.dtype))
                final, _ = run(sim, state0, traj.batches, gate)
                return jnp.dot(q, probe_losses(sim, probe_vars(final), probe))

            ones = jnp.ones(n)
            hvp = jax.jit(lambda v, f=objective, a=ones: jax.jvp(jax.grad(f), (a,), (v,))[1])
            tic = time.perf_counter()
            hess = np.stack([np.asarray(hvp(jnp.eye(n)[j])) for j in range(n)])
            hess_s = time.perf_counter() - tic
            second = est - 0.5 * np.diag(hess)
            row = {"dataset": args.dataset, "setting": name, "seed": seed, "steps": T,
                   "first_order_vs_loo": correlations(est, loo),
                   "second_order_vs_loo": correlations(second, loo),
                   "sum_ratio_first": float(est.sum() / loo.sum()),
                   "sum_ratio_second": float(second.sum() / loo.sum()),
                   "leave_one_out_seconds": loo_s, "estimate_seconds": est_s,
                   "hessian_seconds": hess_s, "hutchinson": {},
                   "leave_one_out": loo, "estimate": est, "hessian": hess}
            rng = np.random.default_rng(seed)
            for k in [int(v) for v in args.probes.split(",")]:
                z = rng.choice([-1.0, 1.0], size=(k, n))
                diag = np.mean(z * (z @ hess.T), axis=0)  # E[z ⊙ Hz] = diag H
                row["hutchinson"][str(k)] = correlations(est - 0.5 * diag, loo)
            rows.append(row)
            f1, f2 = row["first_order_vs_loo"], row["second_order_vs_loo"]
            hut = " ".join(f"K={k}: S {v['spearman']:.3f}" for k, v in row["hutchinson"].items())
            print(f"{name:12s} seed {seed}: Spearman vs LOO first {f1['spearman']:.3f}, second "
                  f"{f2['spearman']:.3f} (Σ ratio {row['sum_ratio_first']:.2f} → "
                  f"{row['sum_ratio_second']:.2f}); Hutchinson {hut}; LOO {loo_s:.1f} s, "
                  f"estimate {est_s:.1f} s, {n} HVPs {hess_s:.1f} s", flush=True)
            done(rows)
    return rows


def timed_calls(fn, calls: int = 2) -> list[float]:
    """Seconds of ``calls`` calls of ``fn`` (the first with compilation, the rest warm)."""
    out = []
    for _ in range(calls):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - tic)
    return out


def cost_at(n: int, args) -> dict:
    from dicejax.apps.contribution import coalition_values, contributions, leave_one_out, shapley
    from dicejax.experiments.common import RunConfig, build
    from dicejax.simulate import simulate

    T = args.cost_steps
    # digits' 1,347 train images are too few for disjoint local sets of 16 above 84 nodes:
    # there every node's batches are drawn with replacement from the whole train split
    # (the data do not change the cost)
    config = RunConfig(dataset="digits", nodes=min(n, 64), topology="exponential",
                       model="mlp", lr=0.1, batch=16, steps=T, seed=0, eval_every=0)
    setup = build(config, np.float64)
    if n <= 64:
        params, batches, topo = setup.params, setup.source(0, T), setup.topology
    else:
        import dicejax as dj

        params = dj.models.init_params(setup.model, jax.random.PRNGKey(0),
                                       setup.dataset.input_shape, num_nodes=n,
                                       same_init=True, dtype=np.float64)
        idx = np.random.default_rng(0).integers(0, len(setup.dataset.y_train), (T, n, 16))
        batches = {"x": np.asarray(setup.dataset.x_train[idx], np.float64),
                   "y": np.asarray(setup.dataset.y_train[idx])}
        topo = dj.topology.exponential(n)
    traj = simulate(setup.loss_fn, params, batches, topo, setup.optimizer, record=True)
    loss, probe = setup.loss_fn, setup.probe
    row = {"nodes": n, "steps": T}
    calls = 2 if n <= args.warm_exact_up_to else 1
    row["exact_calls"] = calls
    row["estimate_seconds"] = timed_calls(lambda: contributions(loss, traj, probe).influence)
    if n > args.extrapolate_above:
        eight = np.ones((8, n))
        eight[np.arange(8), np.arange(8)] = 0
        runs = timed_calls(lambda: coalition_values(loss, traj, probe, eight))
        row["leave_one_out_seconds"] = [t * (n + 1) / 8 for t in runs]
        row["shapley_round_seconds"] = [t * (2 * (n - 1) + 2) / 8 for t in runs]
        row["extrapolated_from_8_runs"] = True
    else:
        row["leave_one_out_seconds"] = timed_calls(lambda: leave_one_out(loss, traj, probe),
                                                   calls)
        row["shapley_round_seconds"] = timed_calls(lambda: shapley(
            loss, traj, probe, num_permutations=2, round_size=2).values, calls)
        row["extrapolated_from_8_runs"] = False
    print(f"n = {n:4d}, T = {T}: estimate {row['estimate_seconds'][-1]:.2f} s "
          f"(first {row['estimate_seconds'][0]:.2f}), leave-one-out "
          f"{row['leave_one_out_seconds'][-1]:.2f} s (first "
          f"{row['leave_one_out_seconds'][0]:.2f})"
          + (" [extrapolated from 8 runs]" if row["extrapolated_from_8_runs"] else "")
          + f", Shapley per 2 permutations {row['shapley_round_seconds'][-1]:.2f} s",
          flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        import json

        rows = [r for f in args.summarize for r in json.loads(Path(f).read_text())["agreement"]]
        print_summary(summarize(rows))
        return 0
    jax.config.update("jax_enable_x64", True)
    result = {"machine": machine_info(), "git": git_state(), "load_start": load_average(),
              "args": vars(args)}
    if args.part in ("agreement", "both"):
        def done(rows):  # what is done survives a later failure
            result["agreement"] = rows
            write_json(Path(args.out), result)

        result["agreement"] = agreement(args, done)
        result["agreement_summary"] = summarize(result["agreement"])
        print_summary(result["agreement_summary"])
    if args.part == "curvature":
        def keep(rows):
            result["curvature"] = rows
            write_json(Path(args.out), result)

        result["curvature"] = curvature(args, keep)
    if args.part in ("cost", "both"):
        result["cost"] = []
        for n in [int(v) for v in args.cost_nodes.split(",")]:
            result["cost"].append(cost_at(n, args))
            write_json(Path(args.out), result)  # what is done survives a later failure
    result["load_end"] = load_average()
    write_json(Path(args.out), result)
    print(f"load average {result['load_start']} -> {result['load_end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
