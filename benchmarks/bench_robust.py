"""Cost of Byzantine-robust gossip (:mod:`dicejax.robust`) against the weighted average.

For the MLP 784→128→10 (101,770 parameters per node, float32) on exponential graphs, this
times one combine step of every rule (median over interleaved repeats, after warm-up) and
one whole training step (local SGD update on a batch of 16 plus the combine), beside the
plain weighted average; also the generic ``jnp.sort`` over the slots that the rules' sorting
network replaces (the median through it). JSON to ``benchmarks/results/bench_robust.json``.

Usage::

    python benchmarks/bench_robust.py [--nodes 16,32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.table import Table

import dicejax as dj
from benchmarks import common
from benchmarks.bench_overhead import _median_ms
from benchmarks.bench_simulate import INPUT_SHAPE, NUM_CLASSES, make_model

DEFAULT_OUT = common.RESULTS_DIR / "bench_robust.json"


def median_by_sort(mixer: dj.robust.RobustMixer, tree):
    """The coordinate-wise median through ``jnp.sort`` over a gathered ``[n, D, ...]``
    buffer (the formulation the sorting network replaced)."""
    heard, _ = mixer.heard_at(0)
    count = heard.sum(1)

    def one(x):
        vals = jnp.take(x, mixer.indices, axis=0, mode="fill", fill_value=0)
        mask = heard.reshape(heard.shape + (1,) * (x.ndim - 1))
        ranked = jnp.sort(jnp.where(mask, vals, jnp.inf), axis=1)
        shape = (-1, 1) + (1,) * (x.ndim - 1)
        lo = jnp.take_along_axis(ranked, ((count - 1) // 2).reshape(shape), axis=1)[:, 0]
        hi = jnp.take_along_axis(ranked, (count // 2).reshape(shape), axis=1)[:, 0]
        return (lo + hi) / 2

    return jax.tree.map(one, tree)


def case(n: int, repeats: int) -> dict:
    model = make_model("mlp")
    loss_fn = dj.models.make_loss_fn(model)
    params = dj.models.init_params(model, jax.random.PRNGKey(0), INPUT_SHAPE, num_nodes=n,
                                   same_init=False)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((n, 16, *INPUT_SHAPE), np.float32)),
             "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (n, 16)), jnp.int32)}
    topo = dj.topology.exponential(n)
    plain = dj.mixing.from_topology(topo)
    mixers = {"weighted average": plain}
    for rule in dj.robust.RULES:
        mixers[rule] = dj.robust.by_name(rule).wrap(plain)
    combine = {name: jax.jit(lambda p, m=m: m.apply(0, p)) for name, m in mixers.items()}
    med = mixers["median"]
    combine["median by jnp.sort"] = jax.jit(lambda p: median_by_sort(med, p))
    got = combine["median by jnp.sort"](params)
    want = combine["median"](params)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    opt = optax.sgd(0.1)
    steps = {}
    for name, m in mixers.items():
        sim = dj.atc(loss_fn, opt, m, consensus=False, finite=False)
        state = sim.init(params)
        steps[name] = jax.jit(lambda s, sim=sim: sim.step(s, batch)[0].params)
        steps[name] = (steps[name], state)
    comb_ms = _median_ms({k: (lambda f=f: f(params)) for k, f in combine.items()}, repeats)
    step_ms = _median_ms({k: (lambda f=f, s=s: f(s)) for k, (f, s) in steps.items()}, repeats)
    return {"n": n, "in_degree": int(topo.neighbors.indices.shape[1]),
            "params_per_node": int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(params))),
            "combine_ms": comb_ms, "step_ms": step_ms, "sort_vs_network_max_abs_diff": gap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="16,32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    console = Console()
    load = common.load_average()
    load_text = "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)
    rows = [case(int(n), args.repeats) for n in args.nodes.split(",")]
    t = Table(title=f"robust gossip, MLP 784→128→10, exponential graph, float32, "
                    f"{jax.default_backend()} (load {load_text})")
    for c in ("n", "D", "rule", "combine (ms)", "step (ms)", "step ÷ weighted average"):
        t.add_column(c, justify="right")
    for r in rows:
        base = r["step_ms"]["weighted average"]
        for name, ms in r["combine_ms"].items():
            step = r["step_ms"].get(name)
            t.add_row(str(r["n"]), str(r["in_degree"]), name, f"{ms:.1f}",
                      "" if step is None else f"{step:.1f}",
                      "" if step is None else f"{step / base:.2f}")
    console.print(t)
    result = {"machine": common.machine_info(), "git": common.git_state(),
              "load_average_start": load, "load_average_end": common.load_average(),
              "rows": rows}
    failures = [f"n={r['n']}: sort and network medians differ by "
                f"{r['sort_vs_network_max_abs_diff']:.2e}" for r in rows
                if r["sort_vs_network_max_abs_diff"] > 0]
    return common.finish(args.out, result, failures)


if __name__ == "__main__":
    sys.exit(main())
