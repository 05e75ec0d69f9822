"""Simulation throughput: ``dicejax.simulate`` against PyTorch ATC D-SGD, and against the
machine's own matrix-multiply peak.

Problem (every method computes the same thing, checked before timing): ATC decentralized
SGD (DESIGN §2.1), plain SGD ``lr = 0.1``, exponential graph on ``n`` nodes (the paper's;
``⌊log2(n−1)⌋ + 1`` in-neighbours, self included), every node starting from the same
initial weights, batch ``B = 32`` of synthetic images (standard normal pixels, uniform
labels over 10 classes, seeded; nothing is downloaded), float32: MNIST-sized ``28×28×1``
for ``mlp`` = 784→128→10 (ReLU) and ``cnn`` = the paper's CNN (conv 32 → pool → conv 64
→ pool → 128 → 10); CIFAR-sized ``32×32×3`` for ``resnet18`` = the GroupNorm ResNet-18 of
:class:`dicejax.models.ResNet18` (width ``--resnet-width``; 64 = the standard network, 11.2 M
parameters and ~3.3 GFLOP per image per SGD step, so it is not in the default ``--models``).

Methods (see ``benchmarks/torch_baselines.py``):

* ``dicejax`` — :func:`dicejax.simulate` through its public API (``record=False``; argument
  checks and the finiteness check included), one ``lax.scan`` over the steps, gossip
  ``mixing="auto"`` (dense below 8 nodes or for dense graphs, fused neighbour-row gathers
  otherwise), 4-step unrolled scans for the CNN (the CPU default for convolutions);
* ``reference`` — the authors' style: per-node ``nn.Module`` + ``torch.optim.SGD``, Python
  loops over nodes for the local steps and over nodes × parameters × in-neighbours for gossip;
* ``func`` — stacked ``torch.func`` (``functional_call`` + ``vmap(grad)``), eager, gossip as
  one flat-buffer contraction (dense or gather, the same kernel dicejax picks);
* ``compiled`` — ``func``'s step under ``torch.compile`` (inductor), Python loop over steps;
Reported per (model, n): median node-steps/s over interleaved repeats (each repeat runs every
method once for ``T`` steps from the same state), ratios, achieved GFLOP/s (matmul/conv FLOPs
of forward + weight gradients + input gradients except the first layer's, plus
``2·nnz(W)·P`` for gossip), that as a fraction of the float32 matmul peak measured in the
same run (a 2048² product in XLA and in torch; the larger is "peak"), peak RSS added by one
untimed run of each method, and the max relative parameter difference to dicejax after
``--check-steps`` steps (asserted ``< --tolerance``). JSON goes to
``benchmarks/results/bench_simulate.json``.

Usage::

    python benchmarks/bench_simulate.py                     # the CPU set (make bench)
    python benchmarks/bench_simulate.py --quick             # smoke test, ~1 minute
    python benchmarks/bench_simulate.py --models mlp --nodes 16 --repeats 7
    python benchmarks/bench_simulate.py --models resnet18 --methods dicejax,reference,func
    python benchmarks/bench_simulate.py --device cuda --nodes 16,256,1024,4096   # GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from dicejax.simulate import plan_run

try:
    import torch

    from benchmarks import torch_baselines as tb
except ImportError:  # the torch baselines are optional (pip install -e '.[bench]')
    torch = tb = None

DEFAULT_OUT = common.RESULTS_DIR / "bench_simulate.json"
INPUT_SHAPE = (28, 28, 1)  # the mlp's and the cnn's
INPUT_SHAPES = {"mlp": INPUT_SHAPE, "cnn": INPUT_SHAPE, "resnet18": (32, 32, 3)}
NUM_CLASSES = 10
# node-steps per timed run (T = target / n, clamped to [min_steps, max_steps])
TARGET_NODE_STEPS = {"mlp": 640, "cnn": 24, "resnet18": 8}
CONV_MODELS = ("cnn", "resnet18")  # --cnn-max-nodes and --cnn-repeats apply to these
HEADLINE = {"model": "mlp", "n": 16}  # the goals are stated for this case
GOALS = {"vs_reference": 10.0, "vs_compiled": 1.5, "peak_fraction": 0.70}

PyTree = Any


# ------------------------------------------------------------------------------- problem


@dataclass
class Case:
    """One (model, n) problem, in both frameworks' layouts."""

    model_name: str
    n: int
    steps: int
    batch: int
    lr: float
    loss_fn: Callable
    params: PyTree  # flax, leaves [n, ...]
    batches: dict  # {"x": [T, n, B, H, W, C] f32, "y": [T, n, B] i32}
    topology: Any
    matrix: np.ndarray  # [n, n]
    mixing: str  # the gossip kernel dicejax runs (the torch.func baselines use it)
    mixing_arg: str  # what dicejax.simulate is given (--mixing)
    torch_model: Any  # torch.nn.Module, or None without torch
    torch_params: dict | None  # {name: [n, ...]}
    xs: Any  # torch [T, n, B, C, H, W]
    ys: Any  # torch [T, n, B]
    device: str
    optimizer: optax.GradientTransformation  # one object: simulate is jitted on it (static)
    input_shape: tuple[int, int, int] = INPUT_SHAPE  # (H, W, C) of one image
    info: dict = field(default_factory=dict)


def make_model(name: str, conv: str = "auto", width: int = 64):
    """The benchmark's flax model (``width``: ResNet-18's stem channels, else unused)."""
    if name == "mlp":
        return dj.models.get_model("mlp", NUM_CLASSES, hidden=(128,))
    if name == "cnn":
        return dj.models.get_model("cnn", NUM_CLASSES, conv=conv)
    if name == "resnet18":
        return dj.models.get_model("resnet18", NUM_CLASSES, width=width, conv=conv)
    raise ValueError(f"--models: unknown model {name!r} ({', '.join(INPUT_SHAPES)})")


def train_flops_per_example(model_name: str, model, params: PyTree,
                            input_shape: Sequence[int]) -> int:
    """Matmul/conv FLOPs of one example's SGD step, as ``common.train_flops_per_example``.

    Forward + weight gradients + input gradients of every layer but the first: ``3·fwd −
    first``. ResNet-18's nested parameters are counted by :func:`dicejax.models.
    flops_per_example`; its first layer is the 3x3 stride-1 stem conv.
    """
    if model_name != "resnet18":
        return common.train_flops_per_example(params, input_shape)
    h, w, c = input_shape
    first = 2 * h * w * 9 * c * model.width
    return 3 * dj.models.flops_per_example(model, tuple(input_shape)) - first


def make_case(model_name: str, n: int, steps: int, batch: int, lr: float, seed: int,
              device: str, conv: str = "auto", mixing: str = "auto",
              width: int = 64) -> Case:
    """Builds the problem; the same initial weights and batches for every method."""
    model = make_model(model_name, conv, width)
    shape = INPUT_SHAPES[model_name]
    params = dj.models.init_params(model, jax.random.PRNGKey(seed), shape, num_nodes=n)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, n, batch, *shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(steps, n, batch)).astype(np.int32)
    topo = dj.topology.exponential(n)
    matrix = np.asarray(topo.matrix)
    mixing_arg = mixing
    mixing = plan_run(dj.models.make_loss_fn(model), params,
                      {"x": jnp.asarray(x[:1]), "y": jnp.asarray(y[:1])}, topo,
                      mixing=mixing).sim.mixer.method
    tmodel = tparams = xs = ys = None
    if tb is not None:
        tmodel = tb.make_torch_model(params, shape).to(device)
        tparams = {k: v.to(device) for k, v in tb.to_torch_params(params, shape,
                                                                   tmodel).items()}
        xs, ys = tb.to_torch_images(x).to(device), tb.to_torch_labels(y).to(device)
    p_node = sum(int(np.prod(v.shape[1:])) for v in jax.tree.leaves(params))
    train = train_flops_per_example(model_name, model, params, shape) * batch
    nnz = int(np.count_nonzero(matrix))
    info = {"model": model_name, "n": n, "steps": steps, "batch": batch, "lr": lr,
            "input_shape": list(shape), "params_per_node": p_node,
            "in_degree": int(topo.neighbors.indices.shape[1]),
            "mixing": mixing, "topology": topo.name,
            "train_flops_per_node_step": train,
            "gossip_flops_per_step": 2 * nnz * p_node,
            "flops_per_step": n * train + 2 * nnz * p_node}
    info["xla_grad_flops_per_step"] = _xla_grad_flops(dj.models.make_loss_fn(model), params,
                                                      {"x": x[0], "y": y[0]})
    return Case(model_name, n, steps, batch, lr, dj.models.make_loss_fn(model), params,
                {"x": jnp.asarray(x), "y": jnp.asarray(y)}, topo, matrix, mixing, mixing_arg,
                tmodel,
                tparams, xs, ys, device, optax.sgd(lr), shape, info)


def _xla_grad_flops(loss_fn, params, batch) -> float | None:
    """XLA's own FLOP count of one step's vmapped gradients (cross-check of the model)."""
    try:
        lowered = jax.jit(jax.vmap(jax.grad(loss_fn))).lower(params, batch)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"])
    except Exception:  # cost analysis is best-effort and backend-dependent
        return None


def auto_steps(model: str, n: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(TARGET_NODE_STEPS[model] / n))))


# ------------------------------------------------------------------------------- methods


def _sync(device: str) -> None:
    if torch is not None and device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Method:
    """A timed computation: ``prepare()`` (untimed) returns ``run`` (timed, returns params
    in flax layout for the agreement check when ``check=True``)."""

    name: str
    make: Callable[[Case, int], Callable[[], Any]]  # (case, steps) -> run()
    times: list[float] = field(default_factory=list)


def dicejax_method(case: Case, steps: int) -> Callable[[], Any]:
    batches = jax.tree.map(lambda a: a[:steps], case.batches)

    def run():
        traj = dj.simulate(case.loss_fn, case.params, batches, case.topology, case.optimizer,
                           record=False, mixing=case.mixing_arg)
        return jax.block_until_ready(traj.final_params)

    return run


def reference_method(case: Case, steps: int) -> Callable[[], Any]:
    sim = tb.ReferenceSim(case.torch_model, case.torch_params, case.matrix, case.lr)
    xs, ys = case.xs[:steps], case.ys[:steps]

    def run():
        sim.run(xs, ys)
        _sync(case.device)
        return sim.stacked_params

    return run


def func_method(compile: bool) -> Callable[[Case, int], Callable[[], Any]]:
    sims: dict = {}

    def make(case: Case, steps: int) -> Callable[[], Any]:
        key = (case.model_name, case.n)
        if key not in sims:  # one compiled step per problem, reused across repeats
            sims.clear()
            sims[key] = tb.FuncSim(case.torch_model, case.matrix, case.lr, case.mixing,
                                   compile=compile, device=case.device)
        sim = sims[key]
        xs, ys = case.xs[:steps], case.ys[:steps]

        def run():
            out = sim.run(case.torch_params, xs, ys)
            _sync(case.device)
            return lambda: out

        return run

    return make


def all_methods() -> dict[str, Callable[[Case, int], Callable[[], Any]]]:
    return {"dicejax": dicejax_method, "reference": reference_method,
            "func": func_method(False), "compiled": func_method(True)}


TORCH_METHODS = ("reference", "func", "compiled")


def to_flax(case: Case, out: Any) -> PyTree:
    """A method's result in flax layout (torch methods return a thunk of stacked params)."""
    if callable(out):
        return tb.to_flax_params(out(), case.params, case.input_shape, case.torch_model)
    return jax.tree.map(np.asarray, out)


# ------------------------------------------------------------------------------- harness


def run_case(case: Case, names: Sequence[str], args, log) -> dict:
    makers = all_methods()
    methods = [Method(name, makers[name]) for name in names]
    # 1. agreement check from the same initial weights (this also compiles everything)
    check_steps = min(args.check_steps, case.steps)
    diffs = {}
    ref = None
    for m in methods:
        out = to_flax(case, m.make(case, check_steps)())
        if m.name == "dicejax":
            ref = out
        else:
            diffs[m.name] = tb.max_rel_diff(out, ref)
    # 2. warm-up on the timed length, then interleaved repeats
    if case.steps != check_steps:  # else the check run was the warm-up
        for m in methods:
            common.timed(m.make(case, case.steps))
    repeats = args.cnn_repeats if case.model_name in CONV_MODELS else args.repeats
    for _ in range(repeats):
        for m in methods:
            run = m.make(case, case.steps)  # fresh state (untimed); same compiled code
            gc.collect()
            m.times.append(common.timed(run)[0])
    # 3. memory: one untimed run of each method with an RSS sampler (and, on a GPU, the
    # device allocator's peak: torch's is reset per method; JAX's is its high-water mark)
    memory, device_memory = {}, {}
    cuda = case.device.startswith("cuda")
    for m in methods:
        run = m.make(case, case.steps)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with common.PeakRSS() as rss:
            run()
        memory[m.name] = rss.delta_mb
        if cuda and m.name in TORCH_METHODS:
            device_memory[m.name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif m.name == "dicejax":
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                device_memory[m.name] = stats["peak_bytes_in_use"] / 2**20
    node_steps = case.n * case.steps
    out = {"problem": case.info, "check": {"steps": check_steps, "max_rel_diff": diffs},
           "methods": {}}
    for m in methods:
        med = statistics.median(m.times)
        out["methods"][m.name] = {
            "times_s": m.times, "median_s": med, "node_steps_per_s": node_steps / med,
            "gflops": case.info["flops_per_step"] * case.steps / med / 1e9,
            "peak_rss_added_mb": memory[m.name],
            "device_peak_mb": device_memory.get(m.name)}
    dj_rate = out["methods"].get("dicejax", {}).get("node_steps_per_s")
    if dj_rate:
        out["speedup"] = {f"vs_{k}": dj_rate / v["node_steps_per_s"]
                          for k, v in out["methods"].items() if k != "dicejax"}
    log(f"  {case.model_name} n={case.n} T={case.steps}: " + ", ".join(
        f"{k} {v['node_steps_per_s']:.0f}/s" for k, v in out["methods"].items())
        + f"; check {', '.join(f'{k} {v:.1e}' for k, v in diffs.items())}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn",
                   help="comma-separated: mlp, cnn, resnet18 (default mlp,cnn)")
    p.add_argument("--nodes", default=None,
                   help="comma-separated n (default 4,16,64,256; the cnn and resnet18 stop "
                        "at --cnn-max-nodes)")
    p.add_argument("--cnn-max-nodes", type=int, default=16,
                   help="largest n for the cnn and resnet18 in the default sweep (default "
                        "16: dicejax's CNN step is ~10x slower inside lax.scan on XLA:CPU, "
                        "see RESULTS.md)")
    p.add_argument("--methods", default="dicejax,reference,func,compiled",
                   help="comma-separated")
    p.add_argument("--reference-max-nodes", type=int, default=256,
                   help="skip the reference-style loop above this n (default 256)")
    p.add_argument("--compiled-max-nodes", type=int, default=1 << 30,
                   help="skip torch.compile above this n")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None,
                   help="T per timed run (default: about 640 node-steps for the mlp, 24 "
                        "for the cnn and 8 for resnet18, clamped to [--min-steps, "
                        "--max-steps])")
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cnn-repeats", type=int, default=3,
                   help="repeats for the cnn and resnet18 (default 3; their runs are long "
                        "and steady)")
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of the agreement check (default 3, at most T)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max relative parameter difference allowed (float32; default 1e-4: a "
                        "different summation order can flip a ReLU whose input is within "
                        "rounding of 0, which moves one weight-gradient row; measured up to "
                        "5e-5 after 3 steps, while every baseline agrees to 1e-15 in float64)")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "tf32"],
                   help="float32 products on a GPU: full float32 in both frameworks "
                        "(default) or TensorFloat-32 in both; no effect on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conv", default="auto", choices=list(dj.models.CONV_IMPLS),
                   help="the CNN's and ResNet-18's convolutions (dicejax.models.CNN("
                        "conv=...)): auto (patches on the CPU), xla "
                        "(lax.conv_general_dilated) or patches")
    p.add_argument("--resnet-width", type=int, default=64,
                   help="ResNet-18's stem width (default 64, the standard network; e.g. 8 "
                        "for a smoke test)")
    p.add_argument("--mixing", default="auto", choices=["auto", "dense", "sparse"],
                   help="gossip kernel of dicejax and torch.func (default auto: the one "
                        "dicejax.simulate picks)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: mlp and cnn at n=4, T=4, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if a.quick:
        a.nodes = a.nodes or "4"
        a.steps = a.steps or 4
        a.repeats = a.cnn_repeats = 1
        a.peak_size = min(a.peak_size, 1024)
    explicit_nodes = a.nodes is not None
    a.nodes = [int(x) for x in (a.nodes or "4,16,64,256").split(",") if x.strip()]
    a.models = [x.strip() for x in a.models.split(",") if x.strip()]
    unknown = set(a.models) - set(INPUT_SHAPES)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)} (choose from {', '.join(INPUT_SHAPES)})")
    if a.resnet_width < 1:
        p.error("--resnet-width must be >= 1")
    a.methods = [x.strip() for x in a.methods.split(",") if x.strip()]
    unknown = set(a.methods) - set(all_methods())
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}")
    if tb is None and set(a.methods) & set(TORCH_METHODS):
        print("torch is not installed: timing dicejax only (pip install -e '.[bench]')",
              file=sys.stderr)
        a.methods = [m for m in a.methods if m not in TORCH_METHODS]
    if "dicejax" not in a.methods:
        p.error("--methods: must include dicejax (the agreement check compares against it)")
    if a.repeats < 1 or a.check_steps < 1 or any(x < 2 for x in a.nodes):
        p.error("--repeats and --check-steps must be >= 1, every n >= 2")
    a.explicit_nodes = explicit_nodes
    return a


def print_tables(result: dict, console: Console) -> None:
    m = result["machine"]
    peak = result["peak"]
    console.print(
        f"machine: {m['cpu']} | cpu_count {m['cpu_count']} | jax {m['jax']} ({m['backend']}) "
        f"| torch {m.get('torch')} | load avg {m['load_average'][0]:.1f} -> "
        f"{result['load_average_end'][0]:.1f} | matmul f32 {peak['size']}²: XLA "
        f"{peak['jax_gflops']:.0f}, torch {peak['torch_gflops'] or float('nan'):.0f} GFLOP/s "
        f"(end of run: {result['peak_end']['jax_gflops']:.0f} / "
        f"{result['peak_end']['torch_gflops'] or float('nan'):.0f})", highlight=False)
    names = result["settings"]["methods"]
    for model in result["settings"]["models"]:
        rows = [r for r in result["results"] if r["problem"]["model"] == model]
        if not rows:
            continue
        reps = result["settings"]["cnn_repeats" if model in CONV_MODELS else "repeats"]
        table = Table(title=f"{model}: node-steps/s (median of {reps}),"
                      f" B={result['settings']['batch']}, exponential graph, float32",
                      title_justify="left")
        for col in ["n", "T", *names, *(f"dj ÷ {k}" for k in names if k != "dicejax"),
                    "dicejax GFLOP/s", "% peak", "max rel diff", "RSS MB (dj/ref/func/comp)"]:
            table.add_column(col, justify="right")
        for r in rows:
            ms = r["methods"]
            cells = [str(r["problem"]["n"]), str(r["problem"]["steps"])]
            cells += [f"{ms[k]['node_steps_per_s']:.0f}" if k in ms else "-" for k in names]
            cells += [f"{r['speedup'][f'vs_{k}']:.2f}" if f"vs_{k}" in r.get("speedup", {})
                      else "-" for k in names if k != "dicejax"]
            g = ms["dicejax"]["gflops"]
            cells += [f"{g:.1f}", f"{100 * g / peak['peak_gflops']:.0f}%",
                      f"{max(r['check']['max_rel_diff'].values(), default=0):.1e}",
                      "/".join(f"{ms[k]['peak_rss_added_mb']:.0f}" if k in ms else "-"
                               for k in names)]
            table.add_row(*cells)
        console.print(table)
    for line in result["goal_lines"]:
        console.print(line, highlight=False)


def goals(result: dict) -> list[str]:
    rows = [r for r in result["results"] if r["problem"]["model"] == HEADLINE["model"]
            and r["problem"]["n"] == HEADLINE["n"] and r["problem"]["batch"] == 32]
    if not rows:
        return []
    r = rows[0]
    lines = [f"goals ({HEADLINE['model']} 784-128-10, n={HEADLINE['n']}, B=32):"]
    sp = r.get("speedup", {})
    for key, label in (("vs_reference", "x the reference-style loop"),
                       ("vs_compiled", "x compiled torch.func")):
        if key in sp:
            ok = sp[key] >= GOALS[key]
            lines.append(f"  dicejax {sp[key]:.2f}{label} (goal >= {GOALS[key]}): "
                         f"{'met' if ok else 'MISSED'}")
    frac = r["methods"]["dicejax"]["gflops"] / result["peak"]["peak_gflops"]
    frac_xla = r["methods"]["dicejax"]["gflops"] / result["peak"]["jax_gflops"]
    lines.append(f"  dicejax at {100 * frac:.0f}% of the measured matmul peak "
                 f"({100 * frac_xla:.0f}% of XLA's own) (goal >= "
                 f"{100 * GOALS['peak_fraction']:.0f}%): "
                 f"{'met' if frac >= GOALS['peak_fraction'] else 'MISSED'}")
    return lines


def set_precision(kind: str) -> None:
    """The same float32 matmul precision in JAX and torch (GPUs default to TF32 in places)."""
    jax.config.update("jax_default_matmul_precision",
                      "highest" if kind == "highest" else "tensorfloat32")
    if torch is not None:
        tf32 = kind == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        set_precision(args.matmul_precision)
    console = Console(width=max(150, Console().width))
    wall = time.perf_counter()
    machine = common.machine_info()
    machine["git"] = common.git_state()
    peak = common.matmul_peak(args.peak_size, args.device if tb is not None else None)
    if args.device == "cpu":
        peak["bandwidth_gbs"] = common.bandwidth_gbs(1024)
        peak["bandwidth_16mib_gbs"] = common.bandwidth_gbs(16)
    console.print(f"matmul peak: XLA {peak['jax_gflops']:.0f}, torch "
                  f"{peak['torch_gflops'] or float('nan'):.0f} GFLOP/s; load "
                  f"{machine['load_average'][0]:.1f}", highlight=False)
    results, failures = [], []
    for model in args.models:
        for n in args.nodes:
            if model in CONV_MODELS and not args.explicit_nodes and n > args.cnn_max_nodes:
                continue
            names = [k for k in args.methods
                     if not (k == "reference" and n > args.reference_max_nodes)
                     and not (k == "compiled" and n > args.compiled_max_nodes)]
            steps = args.steps or auto_steps(model, n, args.min_steps, args.max_steps)
            case = make_case(model, n, steps, args.batch, args.lr,
                             args.seed, args.device, args.conv, args.mixing,
                             args.resnet_width)
            case.steps = steps
            case.info["steps"] = steps
            row = run_case(case, names, args, lambda s: console.print(s, highlight=False))
            results.append(row)
            common.write_json(args.out, {  # partial results survive an interrupted run
                "benchmark": "bench_simulate", "complete": False, "machine": machine,
                "peak": peak, "results": results})
            for k, v in row["check"]["max_rel_diff"].items():
                if not v < args.tolerance:
                    failures.append(f"{model} n={n} {k}: max rel diff {v:.2e} >= "
                                    f"{args.tolerance:g}")
            del case
            gc.collect()
    result = {
        "benchmark": "bench_simulate",
        "complete": True,
        "machine": machine,
        "peak": peak,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    result["peak_end"] = common.matmul_peak(args.peak_size,
                                            args.device if tb is not None else None)
    result["load_average_end"] = common.load_average()
    result["goal_lines"] = goals(result)
    result["passed"] = not failures
    result["failures"] = failures
    result["wall_s"] = time.perf_counter() - wall
    print_tables(result, console)
    console.print(f"total wall time {result['wall_s']:.1f} s", highlight=False)
    return common.finish(args.out, result, failures,
                         lambda text: console.print(text, highlight=False))


if __name__ == "__main__":
    sys.exit(main())
