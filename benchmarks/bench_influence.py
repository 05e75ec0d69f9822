"""All-source r-hop DICE-E: dicejax's cascades against walk enumeration (DESIGN §2.3–2.4).

Problem: ``RunConfig(dataset='digits', nodes=16, topology='exponential', model='mlp',
lr=0.1, batch=16, steps=20)``, plain SGD, float32, one recorded trajectory; every score is
for one source step ``t`` and every source node ``j`` at once (uniform ``q = 1/n``).

Baselines ("walk enumeration", as the authors' PyTorch reference computes multi-hop DICE-E,
here in JAX with every per-walk piece jitted so that Python dispatch of un-jitted ops is not
what gets measured):

* ``walks_naive`` (the reference's algorithm): for each source ``j`` (Python loop), each hop
  ``s`` and each walk ``j = k_0 → k_1 → … → k_s = k`` with non-zero weights that ends in the
  shell ``S_s(j)``, the walk is computed from scratch —
  ``δ = W^t[k_1, j] v_j``, then ``δ ← W^{t+m}[k_{m+1}, k_m] (δ − η H_{k_m}^{t+m} δ)`` for
  ``m = 1..s−1`` (forward-over-reverse HVP on node ``k_m``'s own batch at ``θ_{k_m}^{t+m}``),
  then ``q_k g_k^{t+s} · δ``. One jitted call per walk (its HVP chain fused), so
  ``s − 1`` HVPs per walk and ``O(deg^r)`` HVP chains per source;
  ``DICE-E^(r)(j) = q_j g_j^t · v_j + Σ_s Σ_{k ∈ S_s(j)} Σ_walks …``.
* ``walks_prefix`` (NOT what the reference does; a stronger baseline): the same walks as a
  depth-first trie, each prefix's ``δ − ηHδ`` computed once and shared by its extensions
  (subtrees that cannot end in a later shell are pruned).
* network-level reading at horizon ``h``: ``Σ_k q_k g_k^{t+h} · δ_k^{t+h}(j)`` over every walk
  of length ``h`` (every end node), against :func:`dicejax.influence.dice_e_network`.

PyTorch baselines (``benchmarks/torch_baselines.py``), the reference code's own framework and
style: the run is re-trained in torch from the same initial weights and batches with the
reference-style per-node loop (recording every node's ``θ^t``, ``θ^{t+½}``), then

* ``torch_walks``: the same walk enumeration as ``walks_naive``, eager, one (node, batch) at
  a time, every HVP a double backward (``autograd.grad`` of ``∇L · δ``);
* ``torch_network_walks``: the network-level reading by walk enumeration;
* ``torch_one_hop`` (r = 1): Proposition 1 as the reference computes it (training gradient
  of the source, probe gradients of the source and of each out-neighbour after gossip).

dicejax: :func:`dicejax.influence.dice_e` (forward-mode cascade, every source at once) and
:func:`dicejax.influence.dice_e_network` (one adjoint sweep), called through the public API
(argument validation included).

Timing: everything is compiled (warmed up) first; each measurement ends with
``jax.block_until_ready``; methods are interleaved within each repeat and medians reported.
A walk baseline whose full run would exceed ``--budget`` seconds over all repeats is timed
on an evenly spaced subset of sources and extrapolated linearly to all ``n`` (marked ``*``
in the table, ``"extrapolated": true`` in the JSON). Walk and HVP counts are always exact
for all sources.

Usage::

    python benchmarks/bench_influence.py [--repeats 5] [--hops 1,2,3] [--nodes 16] [--quick]
        [--no-torch]
"""

from __future__ import annotations

import argparse
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
from rich.console import Console
from rich.table import Table

from benchmarks import common
from dicejax.experiments.common import RunConfig, build
from dicejax.influence import dice_e, dice_e_network, shells
from dicejax.simulate import Trajectory, simulate

try:
    import torch

    from benchmarks import torch_baselines as tb
except ImportError:  # the torch baselines are optional (pip install -e '.[bench]')
    torch = tb = None

DEFAULT_OUT = common.RESULTS_DIR / "bench_influence.json"
TOLERANCE = 1e-3  # max relative difference allowed between a baseline and dicejax (float32)

PyTree = Any


# ----------------------------------------------------------------------------- jitted pieces


def _pick(tree: PyTree, u, k) -> PyTree:
    """Node ``k`` at recorded step ``u`` of a ``[T, n, ...]`` pytree (indices may be traced)."""
    return jax.tree.map(lambda x: x[u, k], tree)


def _dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Kernels:
    """The per-walk pieces of the walk-enumeration baselines, each one ``jax.jit``-ed.

    Recorded arrays are passed whole with traced indices, so nothing recompiles per node,
    step or walk (only once per walk length).
    """

    def __init__(self, loss_fn: Callable, probe: PyTree):
        grad = jax.grad(loss_fn)

        def hvp(p, batch, vec):  # forward-over-reverse: H(p; batch) vec
            return jax.jvp(lambda x: grad(x, batch), (p,), (vec,))[1]

        def local_step(vec, params, batches, u, k, lr):  # (I − η H_k^u) vec
            hv = hvp(_pick(params, u, k), _pick(batches, u, k), vec)
            return jax.tree.map(lambda x, h: x - lr * h, vec, hv)

        def scale(tree, w):
            return jax.tree.map(lambda x: w * x, tree)

        @jax.jit
        def update(params, half, t, j):  # v_j^t = θ_j^{t+½} − θ_j^t
            return jax.tree.map(jnp.subtract, _pick(half, t, j), _pick(params, t, j))

        @jax.jit
        def probe_grad(params, u, k):  # g_k^u = ∇L(θ_k^u; z')
            return grad(_pick(params, u, k), probe)

        @jax.jit
        def accumulate(acc, g, vec, qk):
            return acc + qk * _dot(g, vec)

        @jax.jit
        def walk(acc, v, g, params, batches, t, mids, weights, qk, lr):
            """``acc + q_k g · δ`` for one walk; ``mids = (k_1..k_{s−1})``, ``weights [s]``."""
            vec = scale(v, weights[0])
            for m in range(1, mids.shape[0] + 1):  # static unroll: one compile per length
                vec = local_step(vec, params, batches, t + m, mids[m - 1], lr)
                vec = scale(vec, weights[m])
            return acc + qk * _dot(g, vec)

        self.update = update
        self.probe_grad = probe_grad
        self.accumulate = accumulate
        self.walk = walk
        self.scale = jax.jit(scale)
        self.local_step = jax.jit(local_step)


# ------------------------------------------------------------------------------ the problem


@dataclass
class Problem:
    loss_fn: Callable
    traj: Trajectory
    probe: PyTree
    step: int
    lr: float
    n: int
    q: np.ndarray  # [n] float32
    mats: np.ndarray  # [R, n, n]: W^t .. W^{t+R-1}
    shells: np.ndarray  # [R, n, n] bool: shells[s-1, k, j] <=> k ∈ S_s(j)
    nbrs: list  # nbrs[m][i]: nodes k with W^{t+m}[k, i] > 0 (i sends to k)
    kernels: Kernels
    num_params: int
    info: dict = field(default_factory=dict)
    torch_rec: Any = None  # tb.Recorded: the same run re-trained in torch (reference style)


def make_problem(nodes: int, max_hops: int, step: int | None, with_torch: bool = True
                 ) -> Problem:
    config = RunConfig(dataset="digits", nodes=nodes, topology="exponential", model="mlp",
                       lr=0.1, batch=16, steps=20)
    setup = build(config)
    traj = simulate(setup.loss_fn, setup.params, setup.batches, setup.topology,
                    setup.optimizer, record=True)
    jax.block_until_ready(traj.params)
    t = config.steps // 2 if step is None else step
    if not 0 <= t <= config.steps - max_hops:
        raise SystemExit(f"--step: must be in [0, {config.steps - max_hops}], got {t}")
    mats = np.asarray(traj.matrices(t, t + max_hops))
    sh = np.asarray(shells(jnp.asarray(mats)))
    nbrs = [[np.flatnonzero(w[:, i] > 0).tolist() for i in range(nodes)] for w in mats]
    leaves = jax.tree.leaves(jax.tree.map(lambda x: x[0, 0], traj.params))
    dtypes = sorted({str(x.dtype) for x in leaves})
    info = {"config": config, "topology": setup.topology.name, "step": t,
            "param_dtypes": dtypes, "probe_size": int(setup.probe["y"].shape[0]),
            "out_degree": [len(x) for x in nbrs[0]]}
    prob = Problem(setup.loss_fn, traj, setup.probe, t, config.lr, nodes,
                   np.full(nodes, 1.0 / nodes, np.float32), mats, sh, nbrs,
                   Kernels(setup.loss_fn, setup.probe), sum(int(x.size) for x in leaves), info)
    if with_torch and tb is not None:
        prob.torch_rec = torch_recording(setup, t + max_hops)
    return prob


def torch_recording(setup, steps: int):
    """Re-trains the first ``steps`` steps in torch (reference style, same initial weights,
    batches and ``W``; on the GPU when torch sees one), recording every node's ``θ^t`` and
    ``θ^{t+½}``."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = tuple(setup.dataset.input_shape)
    model = tb.make_torch_model(setup.params, shape).to(dev)
    tparams = {k: v.to(dev) for k, v in tb.to_torch_params(setup.params, shape, model).items()}
    xs = tb.to_torch_images(np.asarray(setup.batches["x"][:steps])).to(dev)
    ys = tb.to_torch_labels(np.asarray(setup.batches["y"][:steps])).to(dev)
    matrix = np.asarray(setup.topology.matrix)
    sim = tb.ReferenceSim(model, tparams, matrix, setup.config.lr, record=True)
    sim.run(xs, ys)
    return tb.Recorded(sim, xs, ys, tb.to_torch_images(np.asarray(setup.probe["x"])).to(dev),
                       tb.to_torch_labels(np.asarray(setup.probe["y"])).to(dev), matrix,
                       setup.config.lr)


def walks_from(j: int, length: int, nbrs: list) -> list[tuple[int, ...]]:
    """Every walk ``j → k_1 → … → k_length`` with non-zero weights (from scratch)."""
    walks = [(j,)]
    for m in range(length):
        walks = [(*w, k) for w in walks for k in nbrs[m][w[-1]]]
    return walks


# ------------------------------------------------------------------------------- baselines


class Counter:
    def __init__(self):
        self.walks = 0
        self.hvps = 0


def _probe_grads(prob: Problem, dry: bool) -> Callable:
    cache: dict = {}

    def g(s, k):  # computed once per (hop, node), as the reference's per-round test gradient
        if dry:
            return None
        if (s, k) not in cache:
            cache[s, k] = prob.kernels.probe_grad(
                prob.traj.params, np.int32(prob.step + s), np.int32(k))
        return cache[s, k]

    return g


def walks_naive(prob: Problem, hops: int, sources: Sequence[int], dry: bool = False):
    """DICE-E^(r) of ``sources`` by walk enumeration, each walk from scratch (the reference).

    Returns ``(scores [len(sources)] or None when dry, Counter)``.
    """
    K, traj, t = prob.kernels, prob.traj, np.int32(prob.step)
    lr = np.float32(prob.lr)
    g = _probe_grads(prob, dry)
    count, out = Counter(), []
    for j in sources:
        if not dry:
            v = K.update(traj.params, traj.half_params, t, np.int32(j))
            acc = K.accumulate(jnp.zeros((), jnp.float32), g(0, j), v, prob.q[j])
        for s in range(1, hops + 1):
            in_shell = prob.shells[s - 1][:, j]
            for walk in walks_from(j, s, prob.nbrs):
                k = walk[-1]
                if not in_shell[k]:
                    continue
                count.walks += 1
                count.hvps += s - 1
                if dry:
                    continue
                weights = np.array([prob.mats[m][walk[m + 1], walk[m]] for m in range(s)],
                                   np.float32)
                mids = np.array(walk[1:-1], np.int32)
                acc = K.walk(acc, v, g(s, k), traj.params, traj.batches, t, mids, weights,
                             prob.q[k], lr)
        if not dry:
            out.append(acc)
    return (None if dry else jnp.stack(out)), count


def walks_prefix(prob: Problem, hops: int, sources: Sequence[int], dry: bool = False):
    """The same walk sum as :func:`walks_naive`, depth-first with shared prefixes."""
    K, traj = prob.kernels, prob.traj
    g = _probe_grads(prob, dry)
    count, out = Counter(), []
    for j in sources:
        acc = None
        if not dry:
            v = K.update(traj.params, traj.half_params, np.int32(prob.step), np.int32(j))
            acc = K.accumulate(jnp.zeros((), jnp.float32), g(0, j), v, prob.q[j])
        acc = _prefix_trie(prob, hops, j, None if dry else v, acc, g, count, dry)
        if not dry:
            out.append(acc)
    return (None if dry else jnp.stack(out)), count


def _prefix_trie(prob: Problem, hops: int, j: int, v, acc, g, count: Counter, dry: bool):
    """Adds every shell walk of source ``j`` to ``acc``, one HVP per distinct prefix."""
    K, traj, t, lr = prob.kernels, prob.traj, prob.step, np.float32(prob.lr)
    target = [np.zeros(prob.n, bool)] + [prob.shells[s - 1][:, j] for s in range(1, hops + 1)]
    alive = [np.zeros(prob.n, bool) for _ in range(hops + 1)]  # a later shell is reachable
    for m in range(hops - 1, -1, -1):
        nxt = target[m + 1] | alive[m + 1]
        alive[m] = np.array([any(nxt[k] for k in prob.nbrs[m][i]) for i in range(prob.n)])

    def visit(m, i, vec, acc):  # vec = δ_i^{t+m} along the current prefix
        if target[m][i]:
            count.walks += 1
            if not dry:
                acc = K.accumulate(acc, g(m, i), vec, prob.q[i])
        if m == hops or not alive[m][i]:
            return acc
        base = vec
        if m > 0:  # (I − η H_i^{t+m}) δ, shared by every extension of this prefix
            count.hvps += 1
            if not dry:
                base = K.local_step(vec, traj.params, traj.batches, np.int32(t + m),
                                    np.int32(i), lr)
        for k in prob.nbrs[m][i]:
            if target[m + 1][k] or alive[m + 1][k]:
                w = np.float32(prob.mats[m][k, i])
                acc = visit(m + 1, k, None if dry else K.scale(base, w), acc)
        return acc

    return visit(0, j, v, acc)


def network_naive(prob: Problem, horizon: int, sources: Sequence[int], dry: bool = False):
    """Network-level first-order influence at horizon ``h``: every walk of length ``h``."""
    K, traj, t = prob.kernels, prob.traj, np.int32(prob.step)
    lr = np.float32(prob.lr)
    g = _probe_grads(prob, dry)
    count, out = Counter(), []
    for j in sources:
        if not dry:
            v = K.update(traj.params, traj.half_params, t, np.int32(j))
            acc = jnp.zeros((), jnp.float32)
        for walk in walks_from(j, horizon, prob.nbrs):
            count.walks += 1
            count.hvps += horizon - 1
            if dry:
                continue
            k = walk[-1]
            weights = np.array([prob.mats[m][walk[m + 1], walk[m]] for m in range(horizon)],
                               np.float32)
            mids = np.array(walk[1:-1], np.int32)
            acc = K.walk(acc, v, g(horizon, k), traj.params, traj.batches, t, mids, weights,
                         prob.q[k], lr)
        if not dry:
            out.append(acc)
    return (None if dry else jnp.stack(out)), count


def torch_walks(prob: Problem, hops: int, sources: Sequence[int], dry: bool = False,
                network: bool = False):
    """DICE-E^(r) (or the network-level reading) by walk enumeration in eager PyTorch."""
    if dry:
        return None, (network_naive if network else walks_naive)(prob, hops, sources, True)[1]
    prob.torch_rec.clear()  # every timed run recomputes its probe gradients
    scores, _ = tb.dice_e_walks(prob.torch_rec, prob.step, hops, sources, network=network)
    return scores, None


def torch_one_hop(prob: Problem, sources: Sequence[int], dry: bool = False):
    """One-hop DICE-E (Proposition 1) as the reference computes it, eager PyTorch."""
    if dry:
        return None, walks_naive(prob, 1, sources, True)[1]
    prob.torch_rec.clear()
    return tb.dice_e_one_hop(prob.torch_rec, prob.step, sources), None


# --------------------------------------------------------------------------------- harness


_timed = common.timed


def _rel_diff(a, b) -> float:
    """``max |a − b| / max |b|`` (normwise over sources; robust to near-zero scores)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


@dataclass
class Method:
    """One timed computation; walk baselines may run on a subset of sources."""

    name: str
    kind: str  # "walks" (source loop, extrapolable) or "dicejax"
    hops: int  # r (or the horizon h of the network-level reading)
    fn: Callable  # walks: fn(sources, dry) -> (scores, Counter); dicejax: fn() -> scores [n]
    n: int = 0
    full_count: Counter | None = None
    sources: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    result: Any = None

    def run(self) -> float:
        if self.kind == "walks":
            seconds, (scores, _) = _timed(lambda: self.fn(self.sources))
        else:
            seconds, scores = _timed(self.fn)
        self.result = scores
        self.times.append(seconds)
        return seconds

    @property
    def extrapolated(self) -> bool:
        return self.kind == "walks" and len(self.sources) < self.n

    @property
    def median(self) -> float:
        """Median seconds for all ``n`` sources (linear extrapolation when subset-timed)."""
        med = statistics.median(self.times)
        if self.kind == "walks":
            med *= self.n / len(self.sources)
        return med

    def summary(self) -> dict:
        out = {"median_s": self.median, "times_s": self.times,
               "measured_median_s": statistics.median(self.times)}
        if self.kind == "walks":
            out.update(sources_timed=len(self.sources), sources_total=self.n,
                       extrapolated=self.extrapolated, sources=self.sources)
            if self.full_count is not None:
                out.update(walks=self.full_count.walks, hvps=self.full_count.hvps)
        return out


def prepare(method: Method, n: int, budget: float, repeats: int) -> None:
    """Compiles a method, then picks the sources to time so that it fits ``budget`` seconds."""
    method.n = n
    if method.kind == "dicejax":
        _timed(method.fn)  # compile
        return
    _timed(lambda: method.fn([0]))  # compile every walk length
    per_source, _ = _timed(lambda: method.fn([0]))
    fit = n if per_source * n * repeats <= budget else int(budget / (per_source * repeats))
    fit = max(1, min(n, fit))
    method.sources = sorted({int(x) for x in np.linspace(0, n - 1, fit).round()})
    method.full_count = method.fn(range(n), dry=True)[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument("--hops", type=str, default=None, help="comma-separated r (default 1,2,3)")
    p.add_argument("--nodes", type=int, default=None, help="n (default 16)")
    p.add_argument("--step", type=int, default=None, help="source step t (default T // 2)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds a walk baseline may take over all repeats for one r before "
                        "it is timed on a subset of sources and extrapolated (default 60)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: nodes 8, hops 1,2, repeats 1 (explicit flags win)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    quick = {"repeats": 1, "hops": "1,2", "nodes": 8}
    full = {"repeats": 5, "hops": "1,2,3", "nodes": 16}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    try:
        a.hops = sorted({int(h) for h in a.hops.split(",") if h.strip()})
    except ValueError:
        p.error(f"--hops: expected comma-separated positive integers, got {a.hops!r}")
    if not a.hops or a.hops[0] < 1:
        p.error("--hops: every r must be >= 1")
    if a.repeats < 1 or a.nodes < 2:
        p.error("--repeats must be >= 1 and --nodes >= 2")
    return a


def _fmt_s(m: Method | None) -> str:
    if m is None:
        return "-"
    return f"{m.median:.4g}" + ("*" if m.extrapolated else "")


def _ratio(num: Method | None, den: Method) -> str:
    return "-" if num is None else f"{num.median / den.median:.1f}x"


def print_tables(rows: list[dict], methods: dict, machine: dict, prob: Problem) -> None:
    main_cols = ["r", "#walks", "#HVPs naive", "torch walks s", "JAX naive s",
                 "#HVPs prefix", "JAX prefix s", "dice_e s", "vs torch", "vs JAX naive",
                 "vs prefix", "max rel diff"]
    net_cols = ["h", "#walks", "#HVPs naive", "torch walks s", "JAX naive s",
                "dice_e_network s", "vs torch", "vs JAX naive", "max rel diff"]
    main_rows, net_rows = [], []
    for row in rows:
        r = row["hops"]
        naive, prefix, fwd = (methods[r, x] for x in ("walks_naive", "walks_prefix", "dice_e"))
        net, adj = methods[r, "network_walks_naive"], methods[r, "dice_e_network"]
        tw, tnet = methods.get((r, "torch_walks")), methods.get((r, "torch_network_walks"))
        diffs = row["rel_diff"]
        main_rows.append([
            str(r), str(naive.full_count.walks), str(naive.full_count.hvps), _fmt_s(tw),
            _fmt_s(naive), str(prefix.full_count.hvps), _fmt_s(prefix), f"{fwd.median:.4g}",
            _ratio(tw, fwd), _ratio(naive, fwd), _ratio(prefix, fwd),
            f"{max(v for k, v in diffs.items() if 'network' not in k):.2e}"])
        net_rows.append([
            str(r), str(net.full_count.walks), str(net.full_count.hvps), _fmt_s(tnet),
            _fmt_s(net), f"{adj.median:.4g}", _ratio(tnet, adj), _ratio(net, adj),
            f"{max(v for k, v in diffs.items() if 'network' in k):.2e}"])
    title = (f"All-source DICE-E^(r), n={prob.n} {prob.info['topology']}, digits MLP "
             f"({prob.num_params} params), SGD lr {prob.lr}, float32, step t={prob.step}; "
             f"median of {len(next(iter(methods.values())).times)} (seconds, all {prob.n} "
             f"sources)")
    net_title = "Network-level first-order influence at horizon h (every end node)"
    peak = machine["matmul"]
    machine_line = (f"machine: {machine['platform']} | {machine['cpu']} | cpu_count "
                    f"{machine['cpu_count']} | jax {machine['jax']} | torch "
                    f"{machine.get('torch')} | device {machine['device']} "
                    f"({machine['backend']}) | matmul f32 {peak['size']}²: XLA "
                    f"{peak['jax_gflops']:.0f}, torch {peak['torch_gflops'] or float('nan'):.0f}"
                    f" GFLOP/s | load avg {machine['load_average'][0]:.1f} -> "
                    f"{machine['load_average_end'][0]:.1f}")
    notes = ["torch walks = the reference's algorithm in eager PyTorch (every walk from "
             "scratch, double-backward HVPs, one (node, batch) at a time); JAX naive = the "
             "same walks with each walk's HVP chain jitted; prefix = shared walk prefixes "
             "(stronger than the reference)",
             "max rel diff = max_j |baseline_j − dicejax_j| / max_j |dicejax_j| over all "
             f"baselines (asserted < {TOLERANCE:g}; torch re-trains the run itself)"]
    one = methods.get((1, "torch_one_hop"))
    if one is not None:
        notes.append(f"torch one-hop (Proposition 1 as the reference computes it): "
                     f"{_fmt_s(one)} s, dice_e r=1 {_ratio(one, methods[1, 'dice_e'])} faster")
    extrap = [m for m in methods.values() if m.extrapolated]
    for m in extrap:
        notes.append(f"* {m.name} r={m.hops}: timed on {len(m.sources)}/{m.n} sources "
                     f"{m.sources}, extrapolated linearly to {m.n} (an upper bound: the "
                     "probe gradients it caches are shared by fewer sources)")
    console = Console(width=max(140, Console().width))
    console.print(machine_line, highlight=False)
    for cols, body, ttl in ((main_cols, main_rows, title), (net_cols, net_rows, net_title)):
        table = Table(title=ttl, title_justify="left")
        for c in cols:
            table.add_column(c, justify="right")
        for b in body:
            table.add_row(*b)
        console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine_info()
    machine["matmul"] = common.matmul_peak(2048, None if tb is None else "cpu")
    machine["git"] = common.git_state()
    wall = time.perf_counter()
    use_torch = tb is not None and not args.no_torch
    prob = make_problem(args.nodes, max(args.hops), args.step, with_torch=use_torch)
    n, t = prob.n, prob.step
    print(f"problem: {prob.info['topology']}, out-degree {sorted(set(prob.info['out_degree']))}, "
          f"{prob.num_params} params {prob.info['param_dtypes']}, step t={t}, "
          f"hops {args.hops}, repeats {args.repeats}, torch baselines {use_torch}", flush=True)

    methods: dict[tuple[int, str], Method] = {}
    for r in args.hops:
        candidates = [
            Method("walks_naive", "walks", r,
                   lambda s, dry=False, r=r: walks_naive(prob, r, s, dry)),
            Method("walks_prefix", "walks", r,
                   lambda s, dry=False, r=r: walks_prefix(prob, r, s, dry)),
            Method("dice_e", "dicejax", r,
                   lambda r=r: dice_e(prob.loss_fn, prob.traj, prob.probe, step=t, hops=r)),
            Method("network_walks_naive", "walks", r,
                   lambda s, dry=False, r=r: network_naive(prob, r, s, dry)),
            Method("dice_e_network", "dicejax", r,
                   lambda r=r: dice_e_network(prob.loss_fn, prob.traj, prob.probe, step=t,
                                              hops=r)),
        ]
        if use_torch:
            candidates += [
                Method("torch_walks", "walks", r,
                       lambda s, dry=False, r=r: torch_walks(prob, r, s, dry)),
                Method("torch_network_walks", "walks", r,
                       lambda s, dry=False, r=r: torch_walks(prob, r, s, dry, network=True)),
            ]
            if r == 1:
                candidates.append(Method("torch_one_hop", "walks", r,
                                         lambda s, dry=False: torch_one_hop(prob, s, dry)))
        for m in candidates:
            prepare(m, n, args.budget, args.repeats)
            methods[r, m.name] = m
        print(f"compiled r={r}; walk sources timed: "
              + ", ".join(f"{k}={len(m.sources)}/{n}" for (rr, k), m in methods.items()
                          if rr == r and m.kind == "walks"), flush=True)

    for rep in range(args.repeats):  # interleave every method within each repeat
        for m in methods.values():
            m.run()
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    rows, failures = [], []
    for r in args.hops:
        fwd, adj = methods[r, "dice_e"].result, methods[r, "dice_e_network"].result
        diffs = {}
        for name, ref in (("walks_naive", fwd), ("walks_prefix", fwd),
                          ("network_walks_naive", adj), ("torch_walks", fwd),
                          ("torch_network_walks", adj), ("torch_one_hop", fwd)):
            if (r, name) not in methods:
                continue
            m = methods[r, name]
            diffs[name] = _rel_diff(m.result, np.asarray(ref)[m.sources])
            if not diffs[name] < TOLERANCE:
                failures.append(f"r={r} {name}: max rel diff {diffs[name]:.3e} >= {TOLERANCE}")
        speedup = {}
        for base, ours in (("walks_naive", "dice_e"), ("walks_prefix", "dice_e"),
                           ("torch_walks", "dice_e"), ("torch_one_hop", "dice_e"),
                           ("network_walks_naive", "dice_e_network"),
                           ("torch_network_walks", "dice_e_network")):
            if (r, base) in methods:
                speedup[f"{ours}_vs_{base}"] = methods[r, base].median / methods[r, ours].median
        rows.append({
            "hops": r,
            "rel_diff": diffs,
            "speedup": speedup,
            "methods": {name: methods[r, name].summary() for (rr, name) in methods if rr == r},
            "dice_e": np.asarray(fwd),
            "dice_e_network": np.asarray(adj),
        })

    machine["load_average_end"] = common.load_average()
    print_tables(rows, methods, machine, prob)
    total = time.perf_counter() - wall
    print(f"total wall time {total:.1f} s", flush=True)
    result = {
        "benchmark": "bench_influence",
        "machine": machine,
        "problem": {**prob.info, "nodes": n, "num_params": prob.num_params, "dtype": "float32",
                    "optimizer": "sgd", "node_weights": "uniform 1/n"},
        "settings": {"repeats": args.repeats, "hops": args.hops, "budget_s": args.budget,
                     "quick": args.quick, "tolerance": TOLERANCE, "torch": use_torch,
                     "rel_diff": "max_j |baseline_j - dicejax_j| / max_j |dicejax_j|"},
        "results": rows,
        "passed": not failures,
        "failures": failures,
        "wall_s": total,
    }
    return common.finish(args.out, result, failures)


if __name__ == "__main__":
    sys.exit(main())
