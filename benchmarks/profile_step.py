"""Where the time of one dicejax ATC step goes, against the machine's limits.

For one (model, n, B) case (default: the issue's headline, MLP 784→128→10, n = 16, B = 32,
float32, exponential graph) this times, each as a jitted ``lax.scan`` over ``T`` steps on
the same data, interleaved over repeats (median):

* ``grads``     — ``vmap(grad(loss))`` of every node (the forward and backward matmuls);
* ``local``     — ``grads`` plus the SGD update ``θ − η g``;
* ``gossip-dense`` / ``gossip-sparse`` — the mixing alone, dicejax's two kernels
  (:func:`dicejax.mixing.gossip_dense`, :func:`dicejax.mixing.gossip_sparse`);
* ``gossip-fused`` — a prototype sparse kernel: an unrolled ``Σ_d w[:, d] · buf[idx[:, d]]``
  that XLA fuses into one loop (no ``[n, D, P]`` gather buffer);
* ``step``      — :func:`dicejax.simulate.step`, the library's full ATC step, in a scan
  without the per-step metrics (dense and sparse mixer);
* ``step fused (prototype)`` — ``bench_simulate.fused_gossip_step``: update and gossip
  fused per leaf over neighbour lists;
* ``simulate``  — :func:`dicejax.simulate` through the public API (checks included);
* micro-benchmarks of the step's matrix products alone: the vmapped (batched) forward
  ``[n, B, D] × [n, D, H]`` and weight-gradient ``[n, D, B] × [n, B, H]`` products, and the
  same FLOPs as one unbatched product;
* the machine's limits measured in the same run: float32 matmul peak (XLA and torch) and
  memory bandwidth (a jitted ``y = 2x + 1`` over 256 MiB, read + write bytes).

Every row prints ms/step, GFLOP/s (model FLOPs), GB/s (XLA's ``bytes accessed``) and the
roofline bound ``max(FLOPs / peak, bytes / bandwidth)``. Optionally dumps the optimised HLO
of the step (``--dump DIR``). JSON to ``benchmarks/results/profile_step.json``.

Usage::

    python benchmarks/profile_step.py [--model mlp] [--nodes 16] [--batch 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import dicejax as dj
from benchmarks import common
from benchmarks.bench_simulate import INPUT_SHAPE, NUM_CLASSES, fused_gossip_step, make_model
from dicejax import mixing
from dicejax.simulate import init, step

try:
    import torch
except ImportError:
    torch = None

DEFAULT_OUT = common.RESULTS_DIR / "profile_step.json"


def fused_gather_gossip(indices: jax.Array, weights: jax.Array, tree: Any) -> Any:
    """Prototype sparse gossip: ``Σ_d weights[:, d] · x[indices[:, d]]`` unrolled over ``d``.

    Same result as :func:`dicejax.mixing.gossip_sparse` (padded slots carry weight 0 and a
    clamped index), but written as ``D`` gathers summed elementwise, which XLA fuses into a
    single loop over the output instead of materialising the ``[n, D, P]`` gather.
    """
    n, width = indices.shape
    safe = jnp.minimum(indices, n - 1)

    def mix(buf):
        out = weights[:, 0, None].astype(buf.dtype) * jnp.take(buf, safe[:, 0], axis=0)
        for d in range(1, width):
            out = out + weights[:, d, None].astype(buf.dtype) * jnp.take(buf, safe[:, d], axis=0)
        return out

    return mixing._flat_apply(mix, tree)


def _cost(fn, *args) -> dict:
    """XLA's FLOP and byte counts of one call (a scan's body is counted once)."""
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return {"flops": float(cost.get("flops", 0.0)),
                "bytes": float(cost.get("bytes accessed", 0.0))}
    except Exception:
        return {"flops": None, "bytes": None}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dump", type=Path, default=None, help="write the step's optimised HLO")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    console = Console(width=max(140, Console().width))
    n, T, B = args.nodes, args.steps, args.batch

    machine = common.machine_info()
    peak = common.matmul_peak(2048, "cpu" if torch is not None else None)
    bw = common.bandwidth_gbs()
    model = make_model(args.model)
    loss_fn = dj.models.make_loss_fn(model)
    params = dj.models.init_params(model, jax.random.PRNGKey(0), INPUT_SHAPE, num_nodes=n)
    rng = np.random.default_rng(0)
    batches = {"x": jnp.asarray(rng.standard_normal((T, n, B, *INPUT_SHAPE), np.float32)),
               "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (T, n, B)).astype(np.int32))}
    topo = dj.topology.exponential(n)
    opt = optax.sgd(0.1)
    dense = mixing.make_mixer(jnp.asarray(topo.stacked()))
    sparse = mixing.make_mixer(jnp.asarray(topo.stacked()), topo.neighbors.indices)
    p_node = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params))
    train_flops = common.train_flops_per_example(params, INPUT_SHAPE) * B * n
    nnz = int(np.count_nonzero(topo.matrix))

    grads_fn = jax.vmap(jax.grad(loss_fn))

    def scan(body):
        @jax.jit
        def run(params, batches):
            return jax.lax.scan(lambda c, b: (body(c, b), None), params, batches)[0]
        return run

    def body_grads(c, b):  # the gradients are reduced to a scalar: no parameter write
        params, acc = c
        g = grads_fn(params, b)
        return params, acc + sum(jnp.sum(x) for x in jax.tree.leaves(g))

    def body_local(c, b):
        g = grads_fn(c, b)
        return jax.tree.map(lambda p, gg: p - 0.1 * gg, c, g)

    state0 = init(params, opt)
    fused = fused_gossip_step(loss_fn, opt, np.asarray(topo.matrix))
    b0 = jax.tree.map(lambda a: a[0], batches)

    @jax.jit
    def run_step(state, batches, mixer):
        return jax.lax.scan(lambda s, b: (step(loss_fn, opt, mixer, s, b)[0], None),
                            state, batches)[0].params

    def gossip_scan(kind):
        @jax.jit
        def run(params):
            def body(c, _):
                if kind == "dense":
                    return mixing.gossip_dense(dense.matrices[0], c), None
                if kind == "sparse":
                    return mixing.gossip_sparse(sparse.indices, sparse.weights[0], c), None
                return fused_gather_gossip(sparse.indices, sparse.weights[0], c), None
            return jax.lax.scan(body, params, None, length=T)[0]
        return run

    # matrix products of the first dense layer alone (MLP) for the micro-benchmarks
    micro = {}
    if args.model == "mlp":
        d, h = int(np.prod(INPUT_SHAPE)), 128
        xa = jnp.asarray(rng.standard_normal((n, B, d), np.float32))
        wa = jnp.asarray(rng.standard_normal((n, d, h), np.float32))
        ga = jnp.asarray(rng.standard_normal((n, B, h), np.float32))
        x2 = jnp.asarray(rng.standard_normal((n * B, d), np.float32))
        w2 = jnp.asarray(rng.standard_normal((d, h), np.float32))
        hp = jax.lax.Precision.DEFAULT
        micro = {
            "fwd batched [n,B,D]x[n,D,H]": (jax.jit(functools.partial(
                jnp.einsum, "nbd,ndh->nbh", precision=hp)), (xa, wa), 2 * n * B * d * h),
            "wgrad batched [n,D,B]x[n,B,H]": (jax.jit(functools.partial(
                jnp.einsum, "nbd,nbh->ndh", precision=hp)), (xa, ga), 2 * n * B * d * h),
            "same FLOPs unbatched [nB,D]x[D,H]": (jax.jit(jnp.matmul), (x2, w2),
                                                   2 * n * B * d * h),
        }

    flops_step = (train_flops or 0) + 2 * nnz * p_node
    rows: dict[str, dict] = {
        "grads": {"fn": lambda: scan(body_grads)((params, jnp.zeros(())), batches),
                  "flops": train_flops,
                  "cost": _cost(grads_fn, params, b0)},
        "local": {"fn": lambda: scan(body_local)(params, batches), "flops": train_flops,
                  "cost": _cost(body_local, params, b0)},
        "gossip-dense": {"fn": lambda: gossip_scan("dense")(params),
                         "flops": 2 * n * n * p_node,
                         "cost": _cost(lambda p: mixing.gossip_dense(dense.matrices[0], p),
                                       params)},
        "gossip-sparse": {"fn": lambda: gossip_scan("sparse")(params),
                          "flops": 2 * nnz * p_node,
                          "cost": _cost(lambda p: mixing.gossip_sparse(
                              sparse.indices, sparse.weights[0], p), params)},
        "gossip-fused": {"fn": lambda: gossip_scan("fused")(params),
                         "flops": 2 * nnz * p_node,
                         "cost": _cost(lambda p: fused_gather_gossip(
                             sparse.indices, sparse.weights[0], p), params)},
        "step (dense)": {"fn": lambda: run_step(state0, batches, dense), "flops": flops_step,
                         "cost": _cost(lambda st, b: step(loss_fn, opt, dense, st, b)[0].params,
                                       state0, b0)},
        "step (sparse)": {"fn": lambda: run_step(state0, batches, sparse), "flops": flops_step,
                          "cost": _cost(lambda st, b: step(loss_fn, opt, sparse, st,
                                                           b)[0].params, state0, b0)},
        "step fused (prototype)": {
            "fn": lambda: fused(params, state0.opt_state, batches)[0], "flops": flops_step,
            "cost": _cost(lambda p, s, b: fused(p, s, b)[0], params, state0.opt_state,
                          jax.tree.map(lambda a: a[:1], batches))},
        "simulate": {"fn": lambda: dj.simulate(loss_fn, params, batches, topo, opt,
                                               record=False).final_params,
                     "flops": flops_step},
    }
    for name, (fn, fargs, fl) in micro.items():
        rows[name] = {"fn": (lambda fn=fn, fargs=fargs: fn(*fargs)), "flops": fl, "micro": True}

    for r in rows.values():  # compile
        common.timed(r["fn"])
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for k, r in rows.items():
            times[k].append(common.timed(r["fn"])[0])

    table = Table(title=f"{args.model}, n={n}, B={B}, {p_node} params/node, T={T} steps per "
                        f"call, median of {args.repeats}; matmul peak XLA "
                        f"{peak['jax_gflops']:.0f} / torch {peak['torch_gflops'] or 0:.0f} "
                        f"GFLOP/s, bandwidth {bw:.1f} GB/s", title_justify="left")
    for col in ("part", "ms / step", "model GFLOP/s", "% of peak", "XLA bytes/step",
                "GB/s", "roofline ms"):
        table.add_column(col, justify="right")
    out_rows = {}
    for k, r in rows.items():
        med = statistics.median(times[k])
        per = med if r.get("micro") else med / T
        fl = r.get("flops")
        gf = fl / per / 1e9 if fl else None
        cost = r.get("cost") or {}
        by = cost.get("bytes")
        roof = max((fl or 0) / (peak["peak_gflops"] * 1e9), (by or 0) / (bw * 1e9)) \
            if (fl or by) else None
        out_rows[k] = {"seconds_per_step": per, "gflops": gf, "flops_per_step": fl,
                       "xla_bytes_per_step": by, "roofline_s": roof, "times_s": times[k]}
        table.add_row(escape(k), f"{per * 1e3:.3f}", "-" if gf is None else f"{gf:.1f}",
                      "-" if gf is None else f"{100 * gf / peak['peak_gflops']:.0f}%",
                      "-" if by is None else f"{by / 1e6:.1f} MB",
                      "-" if by is None else f"{by / per / 1e9:.1f}",
                      "-" if roof is None else f"{roof * 1e3:.3f}")
    console.print(table)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        hlo = run_step.lower(state0, batches, dense).compile().as_text()
        (args.dump / f"step_{args.model}_n{n}_dense.hlo.txt").write_text(hlo)
        console.print(f"wrote {args.dump}")
    result = {"benchmark": "profile_step", "machine": machine, "peak": peak,
              "bandwidth_gbs": bw, "settings": vars(args) | {"out": str(args.out),
                                                             "dump": str(args.dump)},
              "params_per_node": p_node, "rows": out_rows,
              "load_average_end": common.load_average()}
    common.write_json(args.out, result)
    console.print(f"load avg {machine['load_average'][0]:.1f} -> "
                  f"{result['load_average_end'][0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
