"""Host work per call: what :func:`dicejax.simulate` adds to the compiled run it dispatches.

For the headline MLP case (784→128→10, n = 16, B = 32, exponential graph, float32, plain
SGD) and the paper's CNN, each with ``T`` steps of synthetic MNIST-sized data, this times
after warm-up (median over interleaved repeats):

* ``simulate`` — the public call, ``record=False``: validation, building the simulator and
  its mixer, the run, the divergence check and the Trajectory;
* ``run`` — the same compiled program alone: :func:`dicejax.run` of a simulator built once
  (per-step finiteness flags off, as ``simulate`` runs chunks), blocked on its result;
* the pieces of ``simulate``'s host work on their own: ``plan_run`` (all validation and
  the simulator), ``from_topology`` (the mixer), ``check_params``, the divergence check of
  one chunk and ``Trajectory.from_run``.

``overhead = simulate − run`` is the host work per call; issue 17's goal is ≤ 5 ms for a
second call with equal shapes. JSON to ``benchmarks/results/bench_overhead.json``.

Usage::

    python benchmarks/bench_overhead.py [--models mlp,cnn] [--steps 1,20] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.table import Table

import dicejax as dj
from benchmarks import common
from benchmarks.bench_simulate import INPUT_SHAPE, NUM_CLASSES, make_model
from dicejax import mixing
from dicejax.simulate import auto_unroll, check_params, plan_run, run_chunk

DEFAULT_OUT = common.RESULTS_DIR / "bench_overhead.json"
GOAL_MS = 5.0


def case_fns(model_name: str, n: int, batch: int, steps: int) -> dict[str, Callable[[], Any]]:
    model = make_model(model_name)
    loss_fn = dj.models.make_loss_fn(model)
    params = dj.models.init_params(model, jax.random.PRNGKey(0), INPUT_SHAPE, num_nodes=n)
    rng = np.random.default_rng(0)
    batches = {"x": jnp.asarray(rng.standard_normal((steps, n, batch, *INPUT_SHAPE),
                                                    np.float32)),
               "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, n, batch)), jnp.int32)}
    topo = dj.topology.exponential(n)
    opt = optax.sgd(0.1)
    plan = plan_run(loss_fn, params, batches, topo, opt)
    state0 = plan.run_state
    unroll = auto_unroll(plan.sim, state0, batches, jax.default_backend())
    final, ys = plan.step(state0, batches, None, False)

    def simulate():
        return dj.simulate(loss_fn, params, batches, topo, opt, record=False).final_params

    def run():
        return run_chunk(plan.run_sim, state0, batches, None, record=False,
                                 unroll=unroll)[0].params

    return {
        "simulate": simulate,
        "run": run,
        "plan_run": lambda: plan_run(loss_fn, params, batches, topo, opt).state0,
        "from_topology": lambda: mixing.from_topology(topo, num_nodes=n).matrices,
        "check_params": lambda: check_params(params),
        "divergence check": lambda: plan.check_divergence(state0, final, batches, None, ys, 0),
        "Trajectory": lambda: plan.trajectory(final, [ys], [], [], False).final_params,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--batch", type=int, default=None, help="default 32 (mlp), 16 (cnn)")
    p.add_argument("--steps", default="1,20", help="T per call, comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    console = Console(width=max(120, Console().width))
    result: dict[str, Any] = {"machine": common.machine_info(), "git": common.git_state(),
                              "args": vars(args) | {"out": str(args.out)}, "cases": []}
    goals = []
    for model_name in args.models.split(","):
        batch = args.batch or (32 if model_name == "mlp" else 16)
        for steps in (int(s) for s in args.steps.split(",")):
            load0 = common.load_average()
            ms = common.median_ms(case_fns(model_name, args.nodes, batch, steps), args.repeats)
            overhead = ms["simulate"] - ms["run"]
            row = {"model": model_name, "n": args.nodes, "batch": batch, "steps": steps,
                   "ms": ms, "overhead_ms": overhead, "load": [load0, common.load_average()]}
            result["cases"].append(row)
            table = Table(title=f"{model_name}, n = {args.nodes}, B = {batch}, T = {steps}: "
                                f"host work per call (ms, median of {args.repeats})")
            table.add_column("call")
            table.add_column("ms", justify="right")
            for name, value in ms.items():
                table.add_row(name, f"{value:.2f}")
            table.add_row("[b]simulate − run[/b]", f"[b]{overhead:.2f}[/b]")
            console.print(table)
            console.print(f"load average {load0} → {common.load_average()}")
            goals.append(f"{model_name} T={steps}: simulate adds {overhead:.1f} ms to its run: "
                         f"{'met' if overhead <= GOAL_MS else 'MISSED'} (goal ≤ {GOAL_MS} ms)")
    result["goals"] = goals
    for line in goals:
        console.print(line)
    return common.finish(args.out, result, [], console.print)


if __name__ == "__main__":
    sys.exit(main())
