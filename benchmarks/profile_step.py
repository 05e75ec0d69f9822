"""Where the time of one dicejax ATC step goes, against the machine's limits.

For one (model, n, B) case (default: the issue's headline, MLP 784→128→10, n = 16, B = 32,
float32, exponential graph) this times, each as a jitted ``lax.scan`` over ``T`` steps on
the same data, interleaved over repeats (median):

* ``grads``     — ``vmap(grad(loss))`` of every node (the forward and backward matmuls);
* ``local``     — ``grads`` plus the SGD update ``θ − η g``;
* ``gossip-dense`` / ``gossip-sparse`` — the mixing alone, dicejax's two kernels
  (:func:`dicejax.mixing.gossip_dense`, :func:`dicejax.mixing.gossip_sparse`);
* ``gossip-rolls`` — a prototype kernel: ``Σ_o w_o · roll(x, o)`` over the cyclic offsets
  of the graph;
* ``consensus`` / ``finite check`` — the per-step metrics of :func:`dicejax.simulate`
  alone (each in a scan that also rescales ``θ`` by ``1 + 1e-7``, one elementwise pass, so
  that XLA cannot hoist it);
* ``step``      — :meth:`dicejax.Simulator.step`, the library's full ATC step, in a scan
  without the per-step metrics (dense and sparse mixer);
* ``simulate``  — :func:`dicejax.simulate` through the public API (checks included);
* micro-benchmarks of the step's matrix products alone: the vmapped (batched) forward
  ``[n, B, D] × [n, D, H]`` and weight-gradient ``[n, D, B] × [n, B, H]`` products, the
  same FLOPs as one unbatched product, and the two batched products as ``torch.bmm``;
* the machine's limits measured in the same run: float32 matmul peak (XLA and torch) and
  memory bandwidth (a jitted ``y = 2x + 1``, read + write bytes, over 1 GiB and over
  16 MiB, a working set like one step's, which stays in this CPU's large L3).

Every row prints ms/step, GFLOP/s (model FLOPs), GB/s (XLA's ``bytes accessed``) and the
roofline bound ``max(FLOPs / peak, bytes / bandwidth)`` (with the 16 MiB bandwidth).
Optionally dumps the optimised HLO of the step (``--dump DIR``). ``--ops K`` adds the time
of every XLA operation of the library step (dense mixer, scanned as :func:`dicejax.simulate`
scans it: fully unrolled chunks of :data:`~dicejax.simulate.CONV_UNROLL` steps for a model
with a convolution on the CPU), from a ``jax.profiler`` trace: the ``K`` costliest, each with
its shape and the model operation it comes from (``op_profile``). JSON to
``benchmarks/results/profile_step.json``.

Usage::

    python benchmarks/profile_step.py [--model mlp] [--nodes 16] [--batch 32] [--repeats 7]
    python benchmarks/profile_step.py --model cnn --nodes 16 --batch 16 --steps 8 --ops 20
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
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
from benchmarks.bench_simulate import (
    INPUT_SHAPE,
    NUM_CLASSES,
    make_model,
)
from dicejax import mixing
from dicejax.simulate import auto_unroll
from dicejax.simulator import atc, consensus_distance, node_finite

try:
    import torch
except ImportError:
    torch = None

DEFAULT_OUT = common.RESULTS_DIR / "profile_step.json"


def roll_gossip(matrix: np.ndarray, tree: Any) -> Any:
    """Prototype gossip by cyclic offsets: ``W = Σ_o diag(w_o) S^o`` (``S`` the cyclic
    shift of the node axis, ``w_o[k] = W[k, (k − o) mod n]``), ``Σ_o w_o · roll(x, o)`` per
    leaf over the distinct offsets ``o = (k − j) mod n`` of the support."""
    n = matrix.shape[0]
    k, j = np.nonzero(matrix > 0)
    offsets = np.unique((k - j) % n)
    rows = np.arange(n)
    weights = [matrix[rows, (rows - o) % n] for o in offsets]

    def mix(x):
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = None
        for o, w in zip(offsets, weights, strict=True):
            term = jnp.asarray(w, x.dtype).reshape(shape) * jnp.roll(x, int(o), axis=0)
            out = term if out is None else out + term
        return out

    return jax.tree.map(mix, tree)


def _cost(fn, *args) -> dict:
    """XLA's FLOP and byte counts of one call (a scan's body is counted once)."""
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return {"flops": float(cost.get("flops", 0.0)),
                "bytes": float(cost.get("bytes accessed", 0.0))}
    except Exception:
        return {"flops": None, "bytes": None}


def op_profile(jitted: Any, fargs: tuple, steps: int, repeats: int,
               static: dict | None = None) -> dict:
    """Time per XLA operation of ``jitted(*fargs)`` from a ``jax.profiler`` trace.

    The call runs once to warm up, then ``repeats`` times under the profiler; every
    operation event of the call's module (the trace's ``hlo_module`` and ``hlo_op``) is summed
    and divided by ``repeats * steps``; loops and calls are left out (their bodies'
    operations are counted). XLA:CPU may run independent operations on its threads
    at once, so the sum of the operations can exceed the wall time.

    Args:
      jitted: a ``jax.jit`` function; it is lowered and compiled once.
      fargs: its arguments.
      steps: training steps per call (the per-step divisor).
      repeats: profiled calls.
      static: its static keyword arguments, if any.

    Returns:
      ``{"wall_s_per_step", "ops_s_per_step", "ops": [...]}``, the operations costliest
      first, each ``{"op", "s_per_step", "share", "shape", "source"}`` (``share`` of the sum
      of operations; ``source`` the ``op_name`` metadata XLA keeps, e.g.
      ``.../transpose(jvp(CNN))/Conv_1/dot_general`` for a backward product).
    """
    compiled = jitted.lower(*fargs, **(static or {})).compile()  # once: text and calls
    text = compiled.as_text()
    module = re.match(r"HloModule (\S+?),", text).group(1)
    meta = {}
    containers = set()  # while/call/conditional: their time is their body's operations
    for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", text,
                         re.M):
        if m.group(3) in ("while", "call", "conditional"):
            containers.add(m.group(1))
        src = re.search(r'op_name="([^"]+)"', m.group(4))
        meta.setdefault(m.group(1), (m.group(2), src.group(1) if src else ""))
    jax.block_until_ready(compiled(*fargs))
    with tempfile.TemporaryDirectory() as d:
        tic = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(compiled(*fargs))
        wall = (time.perf_counter() - tic) / (repeats * steps)
        trace = next(Path(d).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        a = e.get("args") or {}
        if (e.get("ph") == "X" and a.get("hlo_module") == module and "hlo_op" in a
                and a["hlo_op"] not in containers):
            total[a["hlo_op"]] += e["dur"] * 1e-6 / (repeats * steps)
    ops_sum = sum(total.values())
    ops = [{"op": k, "s_per_step": v, "share": v / ops_sum if ops_sum else None,
            "shape": meta.get(k, ("?", ""))[0],
            "source": re.sub(r"^jit\([^)]*\)/(while/body/)?(closed_call/)?", "",
                             meta.get(k, ("", ""))[1])}
           for k, v in sorted(total.items(), key=lambda kv: -kv[1])]
    return {"wall_s_per_step": wall, "ops_s_per_step": ops_sum, "ops": ops}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=None,
                   help="T per timed call (default min(20, max(4, 640 // n)))")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dump", type=Path, default=None, help="write the step's optimised HLO")
    p.add_argument("--ops", type=int, default=0, metavar="K",
                   help="also profile the library step per XLA operation; print the K "
                        "costliest (default 0: off)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    console = Console(width=max(140, Console().width))
    n, B = args.nodes, args.batch
    T = args.steps or min(20, max(4, 640 // n))

    machine = common.machine_info()
    peak = common.matmul_peak(2048, "cpu" if torch is not None else None)
    bw_l3 = common.bandwidth_gbs(16)  # a working set like the step's (cache-resident)
    bw = common.bandwidth_gbs(1024)  # DRAM
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

    def metric_scan(fn):  # a per-step metric of the parameters, T times
        @jax.jit
        def run(params):
            def body(c, _):
                return jax.tree.map(lambda x: x * (1 + 1e-7), c), fn(c)
            return jax.lax.scan(body, params, None, length=T)[1]
        return run

    def body_grads(c, b):  # the gradients are reduced to a scalar: no parameter write
        params, acc = c
        g = grads_fn(params, b)
        return params, acc + sum(jnp.sum(x) for x in jax.tree.leaves(g))

    def body_local(c, b):
        g = grads_fn(c, b)
        return jax.tree.map(lambda p, gg: p - 0.1 * gg, c, g)

    state0 = atc(loss_fn, opt, dense).init(params)
    b0 = jax.tree.map(lambda a: a[0], batches)

    def step(mixer, state, batch):  # the library's ATC step without per-step metrics
        return atc(loss_fn, opt, mixer, consensus=False, finite=False).step(state, batch)[0]

    @functools.partial(jax.jit, static_argnames="unroll")
    def run_step(state, batches, mixer, unroll=1):
        return jax.lax.scan(lambda s, b: (step(mixer, s, b), None), state, batches,
                            unroll=unroll)[0].params

    def gossip_scan(kind):
        @jax.jit
        def run(params):
            def body(c, _):
                if kind == "dense":
                    return mixing.gossip_dense(dense.matrices[0], c), None
                if kind == "sparse":
                    return mixing.gossip_sparse(sparse.indices, sparse.weights[0], c), None
                return roll_gossip(np.asarray(topo.matrix), c), None
            return jax.lax.scan(body, params, None, length=T)[0]
        return run

    run_grads, run_local = scan(body_grads), scan(body_local)
    run_gossip = {k: gossip_scan(k) for k in ("dense", "sparse", "rolls")}
    run_consensus = metric_scan(consensus_distance)
    run_finite = metric_scan(node_finite)

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
        "grads": {"fn": lambda: run_grads((params, jnp.zeros(())), batches),
                  "flops": train_flops,
                  "cost": _cost(grads_fn, params, b0)},
        "local": {"fn": lambda: run_local(params, batches), "flops": train_flops,
                  "cost": _cost(body_local, params, b0)},
        "gossip-dense": {"fn": lambda: run_gossip["dense"](params),
                         "flops": 2 * n * n * p_node,
                         "cost": _cost(lambda p: mixing.gossip_dense(dense.matrices[0], p),
                                       params)},
        "gossip-sparse": {"fn": lambda: run_gossip["sparse"](params),
                          "flops": 2 * nnz * p_node,
                          "cost": _cost(lambda p: mixing.gossip_sparse(
                              sparse.indices, sparse.weights[0], p), params)},
        "gossip-rolls (prototype)": {
            "fn": lambda: run_gossip["rolls"](params), "flops": 2 * nnz * p_node,
            "cost": _cost(lambda p: roll_gossip(np.asarray(topo.matrix), p), params)},
        "consensus (library)": {"fn": lambda: run_consensus(params)},
        "finite check (library)": {"fn": lambda: run_finite(params)},
        "step (dense)": {"fn": lambda: run_step(state0, batches, dense), "flops": flops_step,
                         "cost": _cost(lambda st, b: step(dense, st, b).params, state0, b0)},
        "step (sparse)": {"fn": lambda: run_step(state0, batches, sparse), "flops": flops_step,
                          "cost": _cost(lambda st, b: step(sparse, st, b).params, state0, b0)},
        "simulate": {"fn": lambda: dj.simulate(loss_fn, params, batches, topo, opt,
                                               record=False).final_params,
                     "flops": flops_step},
    }
    if micro and torch is not None:  # the same batched products in PyTorch (MKL / oneDNN)
        tx, tw, tg = (torch.from_numpy(np.array(a)) for a in (xa, wa, ga))
        micro["torch.bmm fwd [n,B,D]x[n,D,H]"] = (lambda: torch.bmm(tx, tw), (),
                                                   2 * n * B * d * h)
        micro["torch.bmm wgrad [n,D,B]x[n,B,H]"] = (
            lambda: torch.bmm(tx.transpose(1, 2), tg), (), 2 * n * B * d * h)
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
                        f"GFLOP/s, bandwidth {bw:.1f} GB/s (1 GiB; 16 MiB: {bw_l3:.1f})",
                  title_justify="left")
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
        roof = max((fl or 0) / (peak["peak_gflops"] * 1e9), (by or 0) / (bw_l3 * 1e9)) \
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
    ops = None
    if args.ops:
        # as simulate runs it: fully unrolled chunks for a model with a convolution on CPU
        sim = atc(loss_fn, opt, dense, consensus=False, finite=False)
        unroll = auto_unroll(sim, state0, batches, jax.default_backend())
        k = unroll or T
        part = jax.tree.map(lambda x: x[:k], batches)
        ops = op_profile(run_step, (state0, part, dense), k, args.repeats,
                         static={"unroll": bool(unroll) or 1})
        console.print(ops_table(ops, args.ops))
    result = {"benchmark": "profile_step", "machine": machine, "peak": peak,
              "bandwidth_gbs": bw, "bandwidth_16mib_gbs": bw_l3,
              "settings": vars(args) | {"out": str(args.out), "dump": str(args.dump)},
              "params_per_node": p_node, "rows": out_rows, "op_profile": ops,
              "load_average_end": common.load_average()}
    common.write_json(args.out, result)
    console.print(f"load avg {machine['load_average'][0]:.1f} -> "
                  f"{result['load_average_end'][0]:.1f}; wrote {args.out}")
    return 0


def ops_table(ops: dict, top: int) -> Table:
    """The ``top`` costliest operations of :func:`op_profile` as a table."""
    table = Table(title=f"XLA operations of one library step: {ops['ops_s_per_step'] * 1e3:.1f} "
                        f"ms of operations, {ops['wall_s_per_step'] * 1e3:.1f} ms wall per step")
    for c in ("operation", "ms / step", "share", "shape", "from"):
        table.add_column(c, justify="right" if c in ("ms / step", "share") else "left")
    for o in ops["ops"][:top]:
        table.add_row(escape(o["op"]), f"{o['s_per_step'] * 1e3:.2f}",
                      f"{100 * o['share']:.1f}%", escape(o["shape"]), escape(o["source"]))
    return table


if __name__ == "__main__":
    sys.exit(main())
