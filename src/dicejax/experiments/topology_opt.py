"""Topology optimisation: learn edge weights on a fixed support, compare with standard graphs.

Protocol (per seed; everything but the support is redrawn from the seed):

1. the train split is cut into a **validation** slice (``val_size`` examples, drawn with the
   seed) and the rest, which is partitioned over the nodes as configured; the test split is
   never touched until step 4;
2. the edge logits on the support are optimised with Adam (:func:`dicejax.topology_opt.optimize`)
   on the chosen objective — by default the final mean **validation** loss after ``horizon``
   steps of training from the seed's initial parameters, each optimisation step on a fresh
   stream of training batches (so the graph is not fitted to one data order);
3. every topology — the learned one and the baselines — trains the same initial parameters
   on the same training batches (the seed's stream, ``config.steps`` steps, not one of the
   streams seen in step 2);
4. the final parameters are evaluated on the **test** split: mean node test loss and
   accuracy, the worst node's accuracy, the accuracy of the nodes' average model, and the
   consensus distance ``(1/n) Σ_k ||θ_k − θ̄||²``.

Baselines (see :data:`BASELINES`): ``uniform`` (uniform weights on the support: the
learned graph's starting point), ``metropolis_hastings`` (on the support; symmetric supports
only), ``ring`` (degree 2), ``ring_lattice`` (the circulant ring with offsets ``±1..±d/2``,
the ring of the support's degree ``d``) and ``exponential`` (directed, degree ``⌊log2(n-1)⌋+1``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import data as data_lib
from dicejax import models as model_lib
from dicejax import topology as topo_lib
from dicejax import topology_opt as opt_lib
from dicejax.experiments.common import (
    CHUNK_BYTES,
    ResultStore,
    RunConfig,
    TypedSource,
    make_optimizer,
    make_topology,
    partition_nodes,
    step_bytes,
    window_chunks,
)
from dicejax.simulate import consensus_distance, simulate

BASELINES = ("uniform", "metropolis_hastings", "ring", "ring_lattice", "exponential")
PARAMETERIZATIONS = ("row_softmax", "sinkhorn")
_STREAM_OFFSET = 1_000_003  # optimisation batch streams: seed + offset * (i + 1)


def ring_lattice(n: int, degree: int) -> topo_lib.Topology:
    """Circulant ring with offsets ``±1..±degree/2`` (``degree`` even), uniform weights."""
    if degree < 2 or degree % 2 or degree >= n:
        raise ValueError(f"ring_lattice: degree must be even, >= 2 and < n={n}, got {degree}")
    adj = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)
    for o in range(1, degree // 2 + 1):
        adj[rows, (rows + o) % n] = adj[rows, (rows - o) % n] = True
    return topo_lib.from_adjacency(adj, "uniform", name=f"ring_lattice({n}, degree={degree})")


def _support(config: RunConfig, support: Any) -> tuple[np.ndarray, str]:
    if support is None:
        topo = make_topology(config.topology, config.nodes, config.seed)
        return opt_lib.support_of(topo), topo.name
    if isinstance(support, str):
        topo = make_topology(support, config.nodes, config.seed)
        return opt_lib.support_of(topo), topo.name
    mask = opt_lib.support_of(support)
    if mask.shape[0] != config.nodes:
        raise ValueError(f"support: has {mask.shape[0]} nodes but config.nodes={config.nodes}")
    return mask, getattr(support, "name", "custom")


def _degree(matrix: np.ndarray) -> float:
    off = (np.asarray(matrix) > 0) & ~np.eye(matrix.shape[-1], dtype=bool)
    return float(off.sum(axis=-1).mean())


def _baseline(name: str, support: np.ndarray, n: int) -> topo_lib.Topology | None:
    degree = round(_degree(support.astype(float)))
    if name == "uniform":
        return topo_lib.from_adjacency(support, "uniform", name="uniform on support")
    if name == "metropolis_hastings":
        if not np.array_equal(support, support.T):
            return None  # MH needs an undirected support
        return topo_lib.from_adjacency(support, name="metropolis_hastings on support")
    if name == "ring":
        return topo_lib.ring(n)
    if name == "ring_lattice":
        d = degree - degree % 2
        return ring_lattice(n, d) if 2 <= d < n else None
    if name == "exponential":
        return topo_lib.exponential(n)
    raise ValueError(f"baselines: unknown {name!r}; choose from {BASELINES}")


def _cast(batch: dict, dtype: Any) -> dict:
    return {k: jnp.asarray(v, dtype if np.issubdtype(np.asarray(v).dtype, np.floating)
                           else None) for k, v in batch.items()}


def _seed_setup(config: RunConfig, ds: data_lib.Dataset, seed: int, val_size: int,
                dtype: Any) -> dict:
    """Validation split, partition, model, initial parameters and the evaluation stream."""
    n_train = ds.x_train.shape[0]
    if not 1 <= val_size < n_train:
        raise ValueError(f"val_size: must lie in [1, {n_train}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n_train)
    val_idx, train_idx = perm[:val_size], np.sort(perm[val_size:])
    x_tr, y_tr = ds.x_train[train_idx], ds.y_train[train_idx]
    resample = config.partition == "resample"
    parts = partition_nodes(config, y_tr, seed)
    model = model_lib.get_model(config.model, ds.num_classes)
    params = model_lib.init_params(model, jax.random.PRNGKey(seed), ds.input_shape,
                                   num_nodes=config.nodes, same_init=config.same_init,
                                   dtype=dtype)

    def stream(stream_seed: int, steps: int) -> dict:
        b = data_lib.node_batches(x_tr, y_tr, parts, steps, config.batch, seed=stream_seed,
                                  resample=resample,
                                  samples_per_node=config.samples_per_node if resample else None)
        return _cast(b, dtype)

    def source(stream_seed: int) -> TypedSource:  # the same stream, chunk by chunk
        from dicejax.checkpoint import stream_source

        return TypedSource(stream_source(
            x_tr, y_tr, parts, config.batch, seed=stream_seed, resample=resample,
            samples_per_node=config.samples_per_node if resample else None), dtype)

    val = _cast({"x": ds.x_train[val_idx], "y": ds.y_train[val_idx]}, dtype)
    test = _cast(data_lib.test_set(ds, config.test_size or None), dtype)
    return dict(model=model, loss_fn=model_lib.make_loss_fn(model),
                eval_fn=model_lib.make_eval_fn(model), params=params, stream=stream,
                source=source, val=val, test=test, input_shape=ds.input_shape)


@functools.partial(jax.jit, static_argnames="eval_fn")
def _final_metrics(params: Any, test: dict, val: dict, *, eval_fn: Callable) -> dict:
    per_node = jax.vmap(eval_fn, in_axes=(0, None))
    final, on_val = per_node(params, test), per_node(params, val)
    average = eval_fn(jax.tree.map(lambda x: jnp.mean(x, axis=0), params), test)
    return {
        "val_loss": jnp.mean(on_val["loss"]),
        "test_loss": jnp.mean(final["loss"]),
        "test_accuracy": jnp.mean(final["accuracy"]),
        "min_accuracy": jnp.min(final["accuracy"]),
        "average_model_accuracy": average["accuracy"],
        "consensus": consensus_distance(params),
    }


def _evaluate(s: dict, config: RunConfig, optimizer: Any, matrix: np.ndarray,
              source: TypedSource) -> dict:
    """Trains with ``matrix`` on the stream ``source`` (chunk by chunk) and evaluates the
    final params on the test set."""
    eval_every = config.eval_every or config.steps
    itemsize = np.dtype(source.dtype or np.float32).itemsize
    chunk = max(1, min(config.steps, CHUNK_BYTES // step_bytes(config, s["input_shape"],
                                                               itemsize)))
    traj = simulate(s["loss_fn"], s["params"], window_chunks(source, 0, config.steps, chunk),
                    topo_lib.from_matrix(matrix), optimizer, record=False,
                    eval_batch=s["test"], eval_fn=s["eval_fn"], eval_every=eval_every)
    metrics = _final_metrics(traj.final_params, s["test"], s["val"], eval_fn=s["eval_fn"])
    ev = traj.metrics["eval"]
    return {
        **{k: float(v) for k, v in metrics.items()},
        "train_loss_curve": np.asarray(traj.metrics["loss"]).mean(axis=1),
        "test_loss_curve": np.asarray(ev["loss"]).mean(axis=1),
        "eval_step": np.asarray(ev["step"]),
    }


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "values": v}


def compare(
    config: RunConfig,
    seeds: int | Sequence[int] = 3,
    support: Any = None,
    opt_steps: int = 30,
    *,
    objective: str = "probe_loss",
    parameterization: str = "sinkhorn",
    opt_lr: float = 0.05,
    horizon: int | None = None,
    val_size: int = 128,
    baselines: Sequence[str] = BASELINES,
    max_degree: int | None = None,
    entropy_weight: float = 0.0,
    sinkhorn_iters: int = 50,
    dtype: Any = None,
    callback: Callable[[str], None] | None = None,
    progress: Callable[[int, str, int, int], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict:
    """Learns a graph on ``support`` per seed and compares it with baselines on test data.

    Args:
      config: the run (dataset, nodes, model, local optimizer, lr, batch, steps, partition;
        ``config.topology`` is the support when ``support`` is None; ``config.seed`` fixes
        the support of random builders such as ``random_regular``).
      seeds: number of seeds (``config.seed, config.seed + 1, ...``) or explicit seeds.
      support: a builder name, a :class:`~dicejax.topology.Topology`, an ``[n, n]``
        adjacency, or None (``config.topology``). Self-loops are always allowed.
      opt_steps: Adam steps on the edge logits.
      objective: a name of :data:`dicejax.topology_opt.OBJECTIVES`; ``probe_loss`` and
        ``fairness`` are measured on the validation slice (never the test split).
      parameterization: ``sinkhorn`` (doubly stochastic: every node's data keeps total
        weight 1 per step; symmetric ``W`` on symmetric supports) or ``row_softmax``
        (row-stochastic: the graph may also re-weight whose data counts).
      opt_lr: Adam's step size on the logits.
      horizon: training steps unrolled by the objective (default ``config.steps``).
      val_size: size of the validation slice cut from the train split.
      baselines: names from :data:`BASELINES`; inapplicable ones (MH on a directed support)
        are skipped.
      max_degree: hard in-degree budget of the learned graph (None: the support's).
      entropy_weight: soft degree budget (see :func:`dicejax.topology_opt.row_entropy`).
      sinkhorn_iters: Sinkhorn iterations.
      dtype: float dtype of parameters and data (default float32).
      callback: progress messages.
      progress: ``progress(seed index, phase, done, total)``: phase ``"optimise"`` after each
        Adam step on the logits, ``"train"`` after each topology's evaluation run.
      checkpoint_dir: keep every finished seed there; a second call with the same folder
        resumes with the next seed.

    Returns:
      A JSON-ready dict: ``topologies[name]`` with ``degree``, ``spectral_gap`` (``1 − |λ₂|``
      per seed) and, for each metric of ``METRICS``, ``{"mean", "std", "values"}`` over
      seeds, plus mean curves, and ``same_as`` (the earlier topology whose matrix it equals
      in every seed, e.g. Metropolis–Hastings = uniform on a regular support, or None);
      ``learned`` with the learned matrices and optimisation histories per seed; the
      protocol settings and wall times.
    """
    seed_list = (list(range(config.seed, config.seed + seeds)) if isinstance(seeds, int)
                 else [int(s) for s in seeds])
    if not seed_list:
        raise ValueError("seeds: need at least one seed")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization: must be one of {PARAMETERIZATIONS}, "
                         f"got {parameterization!r}")
    if isinstance(opt_steps, bool) or not isinstance(opt_steps, int) or opt_steps < 0:
        raise ValueError(f"opt_steps: must be a non-negative integer, got {opt_steps!r}")
    horizon = config.steps if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon: must be a positive integer, got {horizon!r}")
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"baselines: unknown {name!r}; choose from {BASELINES}")
    fn = opt_lib.get_objective(objective)
    mask, support_name = _support(config, support)
    n = config.nodes
    symmetric = bool(np.array_equal(mask, mask.T))
    par = (opt_lib.row_softmax(mask, max_degree) if parameterization == "row_softmax"
           else opt_lib.sinkhorn(mask, sinkhorn_iters, max_degree, symmetric=symmetric))
    # Built once: a new optax object (or jitted step) per seed or topology would recompile.
    topo_opt = opt_lib.topology_optimizer(fn, par, opt_lr, entropy_weight=entropy_weight)
    say = callback or (lambda message: None)
    tell = progress or (lambda i, phase, done, total: None)
    from dicejax.experiments.common import load_data

    ds = load_data(config)
    optimizer = make_optimizer(config.optimizer, config.lr)
    store = None
    if checkpoint_dir is not None:
        store = ResultStore(checkpoint_dir, {
            "experiment": "topology_opt", "config": dataclasses.asdict(config),
            "support": mask.astype(int), "opt_steps": opt_steps, "objective": str(objective),
            "parameterization": parameterization, "opt_lr": opt_lr, "horizon": horizon,
            "val_size": val_size, "baselines": list(baselines), "max_degree": max_degree,
            "entropy_weight": entropy_weight, "sinkhorn_iters": sinkhorn_iters,
            "dtype": None if dtype is None else np.dtype(dtype).name})
    start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    topologies: dict[str, dict] = {}
    learned: dict[str, list] = {"weights": [], "history": [], "effective_degree": [],
                                "opt_seconds": []}
    twins: dict[str, set] = {}  # name -> earlier names with the same matrix, per seed
    for i, seed in enumerate(seed_list):
        piece = None if store is None else store.get(f"seed_{seed}")
        if piece is not None:
            for key in learned:
                learned[key].append(piece["learned"][key])
            for name, row in piece["rows"].items():
                rows.setdefault(name, []).append(row)
            for name, same in piece["twins"].items():
                twins[name] = twins.get(name, same) & same
            tell(i, "optimise", opt_steps, opt_steps)
            tell(i, "train", len(piece["rows"]), len(piece["rows"]))
            continue
        s = _seed_setup(config, ds, seed, val_size, dtype)

        def problem(step, s=s, seed=seed):
            batches = s["stream"](seed + _STREAM_OFFSET * (step + 1), horizon)
            return opt_lib.Problem.create(s["loss_fn"], s["params"], batches, s["val"],
                                          optimizer)

        t0 = time.perf_counter()
        def on_step(k, v, i=i):
            say(f"seed {i + 1}/{len(seed_list)}: optimising the graph, step {k + 1}/"
                f"{opt_steps}, objective {v:.4g}")
            tell(i, "optimise", k + 1, opt_steps)

        result = opt_lib.optimize(fn, problem, par, opt_steps, optimizer=topo_opt,
                                  callback=on_step)
        piece_learned = {"opt_seconds": time.perf_counter() - t0}
        w = np.asarray(result.weights, dtype=np.float64)
        w = w / w.sum(axis=-1, keepdims=True)  # float32 rounding → exactly row-stochastic
        piece_learned["weights"] = w
        piece_learned["history"] = np.asarray(result.history)
        piece_learned["effective_degree"] = np.asarray(
            opt_lib.effective_degree(jnp.asarray(w)))
        for key in learned:
            learned[key].append(piece_learned[key])
        candidates = {"learned": topo_lib.from_matrix(w, name=f"learned ({parameterization})")}
        for name in baselines:
            topo = _baseline(name, mask, n)
            if topo is not None:
                candidates[name] = topo
        source = s["source"](seed)
        done: dict[bytes, dict] = {}  # equal matrices (e.g. MH = uniform on regular graphs)
        first: dict[bytes, str] = {}
        piece_rows, piece_twins = {}, {}
        for j, (name, topo) in enumerate(candidates.items()):
            say(f"seed {i + 1}/{len(seed_list)}: training with {name}")
            # equal to 1e-12: the same graph (uniform = MH on a regular support differ in
            # the last bits of float32), trained once and reported once
            key = np.round(np.asarray(topo.matrix, np.float64), 12).tobytes()
            if key not in done:
                done[key], first[key] = _evaluate(s, config, optimizer, topo.matrix, source), name
            piece_twins[name] = {first[key]} - {name}
            row = dict(done[key])
            row["spectral_gap"] = topo.spectral_gap
            row["degree"] = _degree(topo.matrix)
            row["name"] = topo.name
            piece_rows[name] = row
            tell(i, "train", j + 1, len(candidates))
        for name, row in piece_rows.items():
            rows.setdefault(name, []).append(row)
        for name, same in piece_twins.items():
            twins[name] = twins.get(name, same) & same
        if store is not None:
            store.put(f"seed_{seed}", {"learned": piece_learned, "rows": piece_rows,
                                       "twins": piece_twins})
    for name, per_seed in rows.items():
        entry: dict[str, Any] = {"name": per_seed[0]["name"], "degree": per_seed[0]["degree"],
                                 "spectral_gap": _stats([r["spectral_gap"] for r in per_seed])}
        for metric in METRICS:
            entry[metric] = _stats([r[metric] for r in per_seed])
        entry["curves"] = {
            "train_loss": np.mean([r["train_loss_curve"] for r in per_seed], axis=0),
            "test_loss": np.mean([r["test_loss_curve"] for r in per_seed], axis=0),
            "eval_step": per_seed[0]["eval_step"],
        }
        same = sorted(twins.get(name, set()))
        entry["same_as"] = same[0] if same else None
        topologies[name] = entry
    return {
        "config": config,
        "seeds": seed_list,
        "support": {"name": support_name, "degree": _degree(mask.astype(float)),
                    "matrix": mask.astype(int),
                    "symmetric": symmetric},
        "objective": objective if isinstance(objective, str) else getattr(fn, "__name__", "?"),
        "parameterization": parameterization,
        "opt_steps": opt_steps,
        "opt_lr": opt_lr,
        "horizon": horizon,
        "val_size": val_size,
        "max_degree": max_degree,
        "entropy_weight": entropy_weight,
        "protocol": ("objective on a validation slice of the train split, fresh training "
                     "batch streams per optimisation step; evaluation on the test split"),
        "topologies": topologies,
        "learned": learned,
        "wall_seconds": time.perf_counter() - start,
    }


METRICS = ("val_loss", "test_loss", "test_accuracy", "min_accuracy", "average_model_accuracy",
           "consensus")
"""Per-topology metrics of :func:`compare` (mean ± std over seeds)."""
