"""Scaling of a sharded ``dicejax.simulate`` with the device count, and a memory model.

Part 1 — throughput. ATC D-SGD (plain SGD, lr 0.1), ``--nodes`` nodes, the paper's MLP
(``in → 128 → 64 → 10``, ReLU) on MNIST-sized synthetic data (``28×28×1`` standard normal
pixels, uniform labels, seeded; nothing is downloaded), batch ``--batch``, float32,
``record=False``, one ``lax.scan`` of ``--steps`` steps per call. For every graph and every
device count ``d`` in ``--devices`` the node axis is sharded over the first ``d`` devices
(:func:`dicejax.parallel.node_mesh`) with the kernel named in the table:

* ``ring`` / ``exponential`` — halo exchange (``ppermute``; only the rows another device
  needs move);
* ``erdos_renyi`` — ``all_gather`` + local neighbour gather (an arbitrary sparse graph);
* ``dense`` — the exponential graph's dense ``W`` through GSPMD.

Batches are placed on the mesh before timing (so the timed call is the run, not the
host-to-device copy); every call ends with ``jax.block_until_ready``; medians over
``--repeats``. Each sharded run's final parameters are checked against the unsharded run
(``max |Δθ|``, float32). Reported: node-steps/s, speed-up over ``d = 1`` (a 1-device mesh),
parallel efficiency, and the rows a device receives per gossip step.

On a CPU, ``--force-cpu-devices N`` splits the host into ``N`` XLA devices (set before JAX
starts). They share the same cores, so CPU numbers show the sharding's overhead, not a
speed-up; real scaling needs several accelerators (``--devices 1,2,4,8`` on a multi-GPU
host).

Part 2 — memory. :func:`dicejax.parallel.memory_model` for the paper's MLP, CNN and
ResNet-18 (SGD and Adam): bytes per node for parameters, optimizer state, activations kept
for the backward pass and one batch, and the largest ``n`` that fits ``--card-gb`` GB per
device (90 % usable) on 1 and 8 devices, for a ring (halo exchange) and for dense gossip,
for ``--mem-steps`` steps per scan with and without recording. The activations are what
the backward pass keeps (``jax.vjp`` residuals, backend-independent); the workspace is
XLA's temporary memory for one node's gradient on the backend running this script (on a
CPU host it is the CPU's, not a GPU's). The model is checked against XLA's own buffer
assignment of the compiled 1-device scan on this backend (``model_check`` in the JSON).

Usage::

    python benchmarks/bench_scaling.py --force-cpu-devices 4 --devices 1,2,4   # CPU, both
    python benchmarks/bench_scaling.py --only throughput --force-cpu-devices 4
    python benchmarks/bench_scaling.py --devices 1,2,4,8 --nodes 1024          # 8 GPUs
    python benchmarks/bench_scaling.py --only memory --card-gb 80

Writes ``benchmarks/results/bench_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4", help="device counts, comma separated")
    p.add_argument("--force-cpu-devices", type=int, default=0,
                   help="split the CPU into this many XLA devices (before JAX starts)")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graphs", default="ring,exponential,erdos_renyi,dense")
    p.add_argument("--card-gb", type=float, default=80.0)
    p.add_argument("--mem-steps", type=int, default=100)
    p.add_argument("--only", choices=("throughput", "memory"), default=None,
                   help="run one part (default: both)")
    p.add_argument("--no-workspace", dest="workspace", action="store_false",
                   help="skip compiling each model's gradient for its XLA workspace")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                        / "bench_scaling.json"))
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.force_cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={ARGS.force_cpu_devices}".strip())

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dicejax as dj  # noqa: E402
from dicejax import parallel  # noqa: E402

INPUT = (28, 28, 1)


def problem(n: int, steps: int, batch: int, seed: int = 0):
    model = dj.models.get_model("mlp", 10)
    loss_fn = dj.models.make_loss_fn(model)
    params = dj.models.init_params(model, jax.random.key(seed), INPUT, num_nodes=n)
    rng = np.random.default_rng(seed)
    batches = {
        "x": rng.standard_normal((steps, n, batch, *INPUT), dtype=np.float32),
        "y": rng.integers(0, 10, size=(steps, n, batch)).astype(np.int32),
    }
    return loss_fn, params, batches


def graph(name: str, n: int):
    """(topology, mixing) for each benchmarked graph."""
    if name == "ring":
        return dj.topology.ring(n), "ppermute"
    if name == "exponential":
        return dj.topology.exponential(n), "ppermute"
    if name == "erdos_renyi":
        return dj.topology.erdos_renyi(n, min(1.0, 8.0 / n), seed=0), "all_gather"
    if name == "dense":
        return dj.topology.exponential(n), "dense"
    raise SystemExit(f"unknown graph {name!r}")


def throughput(args) -> list[dict]:
    counts = [int(x) for x in args.devices.split(",")]
    available = len(jax.devices())
    if max(counts) > available:
        raise SystemExit(f"--devices asks for {max(counts)} but JAX sees {available} "
                         "(on a CPU add --force-cpu-devices)")
    n = args.nodes
    loss_fn, params, batches = problem(n, args.steps, args.batch)
    P = dj.models.num_params(jax.tree.map(lambda x: x[0], params))
    rows = []
    for gname in args.graphs.split(","):
        topo, mixing = graph(gname, n)
        ref = dj.simulate(loss_fn, params, batches, topo, record=False,
                          mixing="dense" if mixing == "dense" else "sparse")
        ref_final = jax.tree.map(np.asarray, ref.final_params)
        base = None
        for d in counts:
            mesh = parallel.node_mesh(jax.devices()[:d])
            layout = parallel.node_layout(mesh, n)
            placed = layout.place(batches, axis=1)
            sharded_mixer = parallel.shard_mixer(
                dj.mixing.make_mixer(topo.stacked(), topo.neighbors.indices), layout, mixing)

            def run(placed=placed, mesh=mesh, topo=topo, mixing=mixing):
                return dj.simulate(loss_fn, params, placed, topo, record=False, mixing=mixing,
                                   mesh=mesh).final_params

            out = jax.block_until_ready(run())  # compile
            err = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
                      zip(jax.tree.leaves(out), jax.tree.leaves(ref_final), strict=True))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            rate = n * args.steps / sec
            base = rate if base is None else base
            received = (sharded_mixer.rows_received if mixing == "ppermute"
                        else (d - 1) * layout.block)
            row = dict(graph=gname, kernel=mixing, devices=d, nodes=n, steps=args.steps,
                       seconds=sec, node_steps_per_s=rate, speedup=rate / base,
                       efficiency=rate / base / (d / counts[0]), rows_received=received,
                       bytes_received_per_step=received * P * 4, max_abs_diff=err)
            rows.append(row)
            print(f"{gname:12s} {mixing:10s} d={d:2d}  {rate:10.0f} node-steps/s  "
                  f"x{row['speedup']:.2f}  rows/step {received:5d}  |Δθ| {err:.1e}",
                  flush=True)
    return rows


def memory(args) -> list[dict]:
    rows = []
    card = args.card_gb * 1e9
    for name, shape in (("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)), ("resnet18", (32, 32, 3))):
        model = dj.models.get_model(name, 10)
        loss_fn = dj.models.make_loss_fn(model)
        params = jax.eval_shape(
            lambda k, model=model, shape=shape: dj.models.init_params(model, k, shape),
            jax.random.key(0))
        for batch in (16, 128):
            z = {"x": jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
                 "y": jax.ShapeDtypeStruct((batch,), jnp.int32)}
            base = parallel.memory_model(params, None, loss_fn, z, compiled=args.workspace)
            for opt_name, opt in (("sgd", optax.sgd(0.1)), ("adam", optax.adam(1e-3))):
                mm = base._replace(opt_state=parallel.memory_model(params, opt).opt_state)
                row = dict(model=name, optimizer=opt_name, batch_size=batch,
                           **{f"{k}_bytes": v for k, v in mm._asdict().items()},
                           card_gb=args.card_gb, steps=args.mem_steps)
                for d in (1, 8):
                    for mixing in ("ppermute", "dense"):
                        for record in (False, True):
                            key = f"max_n_d{d}_{mixing}_{'record' if record else 'norecord'}"
                            row[key] = mm.max_nodes(card, d, mixing=mixing,
                                                    steps=args.mem_steps, record=record)
                rows.append(row)
                print(f"{name:9s} {opt_name:4s} B={batch:3d}  params {mm.params / 1e6:7.2f} MB "
                      f"opt {mm.opt_state / 1e6:7.2f} MB  act {mm.activations / 1e6:7.2f} MB "
                      f"(workspace {mm.workspace / 1e6:7.2f})  batch {mm.batch / 1e6:5.2f} MB | "
                      f"max n, 1 card ring {row['max_n_d1_ppermute_norecord']:7d} (dense "
                      f"{row['max_n_d1_dense_norecord']:6d}), 8 cards ring "
                      f"{row['max_n_d8_ppermute_norecord']:7d}", flush=True)
    return rows


def model_check(args) -> list[dict]:
    """The model's bytes for a whole 1-device run against XLA's buffer assignment of the
    compiled scan (arguments + outputs + temporaries − aliased), on this backend."""
    from dicejax.simulator import atc, run  # the jitted scan simulate() calls

    rows = []
    for name, n, steps, batch in (("mlp", 64, 20, 16), ("mlp", 64, 20, 128), ("cnn", 16, 10, 32)):
        model = dj.models.get_model(name, 10)
        loss_fn = dj.models.make_loss_fn(model)
        params = dj.models.init_params(model, jax.random.key(0), INPUT, num_nodes=n)
        batches = {"x": jax.ShapeDtypeStruct((steps, n, batch, *INPUT), jnp.float32),
                   "y": jax.ShapeDtypeStruct((steps, n, batch), jnp.int32)}
        mixer = dj.mixing.make_mixer(dj.topology.exponential(n).stacked())
        one = jax.tree.map(lambda x: x[0], params)
        z = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), batches)
        for opt_name, opt in (("sgd", optax.sgd(0.1)), ("adam", optax.adam(1e-3))):
            for record in (False, True):
                sim = atc(loss_fn, opt, mixer)
                stats = run.lower(sim, sim.init(params), batches, record=record
                                  ).compile().memory_analysis()
                xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                       + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
                out = {}
                for compiled in (False, True):
                    mm = parallel.memory_model(one, opt, loss_fn, z, compiled=compiled)
                    out[compiled] = mm.per_device(n, 1, steps=steps, record=record,
                                                  mixing="dense")
                rows.append(dict(model=name, nodes=n, steps=steps, batch_size=batch,
                                 optimizer=opt_name, record=record, xla_bytes=int(xla),
                                 model_bytes=out[False], model_bytes_workspace=out[True]))
                print(f"{name:4s} n={n} T={steps} B={batch:3d} {opt_name:4s} record={record!s:5s}"
                      f"  XLA {xla / 1e6:8.1f} MB  model {out[False] / 1e6:8.1f} MB "
                      f"({out[False] / xla:.2f}×)  with workspace {out[True] / 1e6:8.1f} MB "
                      f"({out[True] / xla:.2f}×)", flush=True)
    return rows


def main(args) -> None:
    dev = jax.devices()[0]
    info = dict(backend=jax.default_backend(), device_kind=getattr(dev, "device_kind", None),
                devices=len(jax.devices()), jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), cpu_count=os.cpu_count(),
                load_average=list(os.getloadavg()), argv=sys.argv[1:])
    print(info, flush=True)
    result: dict = dict(machine=info)
    if args.only != "throughput":
        result.update(memory=memory(args), model_check=model_check(args))
    if args.only != "memory":
        result["throughput"] = throughput(args)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
