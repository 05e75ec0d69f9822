"""Shared set-up for experiments: a run configuration and everything built from it.

Experiments compose the core (topology, simulate, influence) with data and models; they
return plain data (dicts of numbers and arrays) that the CLI prints and plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import pickle
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import data as data_lib
from dicejax import models as model_lib
from dicejax import topology as topo_lib
from dicejax.simulate import (
    NodeState,
    RunPlan,
    Trajectory,
    final_state,
    plan_run,
)

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a decentralized training run.

    Attributes:
      dataset: ``digits`` | ``fashion_mnist`` | ``mnist`` | ``cifar10``.
      data_dir: directory of the data files (MNIST, CIFAR-10, or another Fashion-MNIST copy).
      nodes: ``n``.
      topology: a builder name of :func:`dicejax.topology.by_name`, or a CSV path.
      model: ``mlp`` | ``cnn`` | ``resnet18``.
      optimizer: ``sgd`` | ``momentum`` | ``adam``.
      lr: learning rate.
      batch: per-node batch size ``B``.
      steps: ``T``.
      partition: ``iid`` | ``dirichlet`` | ``shards`` | ``resample`` (the DICE reference
        code's mode: every epoch each node redraws its samples with replacement).
      samples_per_node: local data set size (default: train size // n; the paper uses 512).
      alpha: Dirichlet concentration for ``partition="dirichlet"`` (the split is redrawn
        until every node holds at least one batch).
      seed: seeds data order, partition and initialisation.
      same_init: every node starts from the same initial parameters (``False``: each node
        is initialised independently, as in the DICE authors' reference code).
      eval_every: evaluate on the test split every this many steps (0 = only at the end).
      test_size: number of test examples used for evaluation (0 = all).
      probe_size: size of the fixed probe batch ``z'`` (from the test split).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    nodes: int = 16
    topology: str = "exponential"
    model: str = "mlp"
    optimizer: str = "sgd"
    lr: float = 0.1
    batch: int = 16
    steps: int = 300
    partition: str = "iid"
    samples_per_node: int | None = None
    alpha: float = 0.5
    seed: int = 0
    same_init: bool = True
    eval_every: int = 50
    test_size: int = 0
    probe_size: int = 128

    def __post_init__(self):
        for name in ("nodes", "batch", "steps", "probe_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("eval_every", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr: must be positive and finite, got {self.lr!r}")
        if self.partition not in ("iid", "dirichlet", "shards", "resample"):
            raise ValueError(f"partition: unknown kind {self.partition!r}")
        if self.eval_every < 0 or self.test_size < 0:
            raise ValueError("eval_every and test_size: must be non-negative")


class TypedSource(NamedTuple):
    """A batch source (:data:`dicejax.checkpoint.BatchSource`) whose float arrays are cast.

    ``source(start, stop)`` gives the batches of global steps ``start .. stop-1`` as host
    (numpy) arrays ``{'x': [stop - start, n, B, ...], 'y': [stop - start, n, B]}``; only
    those steps are generated, so memory does not grow with the run's length.

    Attributes:
      source: the underlying source, e.g. :func:`dicejax.checkpoint.stream_source`.
      dtype: float dtype of the inputs (``None``: as the source gives them, float32).
    """

    source: Callable[[int, int], dict]
    dtype: Any = None

    def __call__(self, start: int, stop: int) -> dict:
        return cast_host(self.source(start, stop), self.dtype)

    def spec(self) -> dict:
        """JSON description for a checkpoint's ``run.json``: the data, not the batches."""
        spec = getattr(self.source, "spec", None)
        base = spec() if callable(spec) else {"kind": "callable"}
        return {**base, "dtype": None if self.dtype is None else np.dtype(self.dtype).name}


def cast_host(batch: dict, dtype: Any) -> dict:
    """Host copies of a batch with its floating-point arrays cast to ``dtype`` (None: kept)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = v.astype(dtype) if dtype is not None and np.issubdtype(v.dtype, np.floating) \
            else v
    return out


#: Default upper bound on the bytes of one chunk of batches (see :func:`default_chunk_steps`).
CHUNK_BYTES = 64 * 2**20


class Setup(NamedTuple):
    """What a :class:`RunConfig` builds.

    The batches are a stream (``source``), generated chunk by chunk as a run consumes them:
    ``chunks()`` iterates over them, ``batch_window(a, b)`` gives steps ``[a, b)``, and
    ``batches`` all ``T`` steps at once (memory ``∝ T``: for short runs and tests only).
    """

    config: RunConfig
    dataset: data_lib.Dataset
    model: Any
    loss_fn: Callable
    eval_fn: Callable
    params: Any  # leaves [n, ...]
    source: TypedSource  # source(a, b): batches of steps [a, b), leaves [b - a, n, B, ...]
    topology: topo_lib.Topology
    optimizer: optax.GradientTransformation
    test: dict  # [M, ...]
    probe: dict  # [P, ...]

    @property
    def batches(self) -> dict:
        """Every step's batches as device arrays, leaves ``[T, n, B, ...]`` (memory ``∝ T``)."""
        return {k: jnp.asarray(v) for k, v in self.source(0, self.config.steps).items()}

    def batch_window(self, start: int, stop: int) -> dict:
        """Host batches of global steps ``[start, stop)``, leaves ``[stop - start, n, B, ...]``."""
        return self.source(start, stop)

    def chunks(self, start: int = 0, stop: int | None = None,
               chunk_steps: int | None = None) -> Iterator[dict]:
        """Host batches of steps ``[start, stop)`` in pieces of ``chunk_steps`` steps.

        Args:
          start: first global step.
          stop: end step (default ``T``).
          chunk_steps: steps per piece (default :func:`default_chunk_steps`).

        Returns:
          An iterator of ``{'x': [S, n, B, ...], 'y': [S, n, B]}`` (the last ``S`` may be
          shorter); one piece is generated at a time.
        """
        stop = self.config.steps if stop is None else stop
        return window_chunks(self.source, start, stop, chunk_steps or self.chunk_steps)

    @property
    def chunk_steps(self) -> int:
        """The default steps per chunk (:func:`default_chunk_steps`)."""
        itemsize = np.dtype(self.source.dtype or np.float32).itemsize
        return default_chunk_steps(self.config, self.dataset.input_shape, itemsize=itemsize)


def window_chunks(source: Callable[[int, int], dict], start: int, stop: int,
                  chunk_steps: int) -> Iterator[dict]:
    """``source(a, b)`` for consecutive windows ``[a, b)`` of ``chunk_steps`` covering
    ``[start, stop)`` (the last may be shorter), generated lazily."""
    for lo in range(start, stop, chunk_steps):
        yield source(lo, min(lo + chunk_steps, stop))


def step_bytes(config: RunConfig, input_shape: Sequence[int], itemsize: int = 4) -> int:
    """Bytes of one step's batches (``n · B`` examples, inputs of ``itemsize`` bytes each,
    int32 labels)."""
    return config.nodes * config.batch * (math.prod(input_shape) * itemsize + 4)


def default_chunk_steps(config: RunConfig, input_shape: Sequence[int], itemsize: int = 4,
                        max_bytes: int = CHUNK_BYTES) -> int:
    """Steps per chunk: about a twentieth of the run, at most ``max_bytes`` of batches.

    A twentieth gives twenty progress updates (and checkpoints); the byte cap keeps the
    resident batches bounded whatever ``steps`` is (64 MiB in float32: 1,008 steps of 16
    digits nodes at batch 16, 83 steps of 16 MNIST nodes).
    """
    by_bytes = max(1, max_bytes // step_bytes(config, input_shape, itemsize))
    return int(max(1, min(config.steps // 20 or 1, by_bytes)))


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """The paper's plain SGD, SGD with momentum 0.9, or Adam."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {name!r}")

@functools.cache
def cached_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """:func:`make_optimizer`, one object per ``(name, lr)``.

    The optimizer is a static argument of the jitted run: reusing one object across seeds
    and calls avoids recompiling everything.
    """
    return make_optimizer(name, lr)


def pick_attackers(attackers: int | Sequence[int] | None, n: int, seed: int) -> list[int]:
    """The attacking nodes of one seed: the given list, or ``attackers`` random ones.

    Args:
      attackers: node indices, a count of nodes drawn at random (seeded by ``seed``), or
        ``None`` for one random attacker.
      n: number of nodes.
      seed: seeds the draw.

    Returns:
      Sorted node indices.
    """
    if attackers is None:
        attackers = 1
    if isinstance(attackers, int | np.integer) and not isinstance(attackers, bool):
        if not 1 <= attackers < n:
            raise ValueError(f"attackers: a count must lie in [1, {n}), got {attackers}")
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xA77AC,)))
        return sorted(rng.choice(n, size=int(attackers), replace=False).tolist())
    chosen = sorted({int(a) for a in attackers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= n:
        raise ValueError(f"attackers: node indices must be non-empty and lie in [0, {n}), "
                         f"got {list(attackers)}")
    return chosen


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of a list of numbers."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


@functools.partial(jax.jit, static_argnames=("eval_fn",))
def evaluate_params(eval_fn: Callable[[Any, Any], dict], params: Any, batch: Any) -> dict:
    """``eval_fn`` of every node's parameters (leaves ``[n, ...]``) on one shared batch."""
    return jax.vmap(eval_fn, in_axes=(0, None))(params, batch)



def make_topology(name: str, n: int, seed: int = 0) -> topo_lib.Topology:
    """A topology by builder name, or from a CSV file when ``name`` is a path."""
    if name.endswith(".csv") or os.path.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"topology: no such file {name!r}")
        if not path.read_text().strip():
            raise ValueError(f"topology: {name!r} is empty; expected an [n, n] table of weights")
        topo = topo_lib.load_csv(path)
        if topo.n != n:
            raise ValueError(f"topology: {name} has {topo.n} nodes but nodes={n}")
        return topo
    kwargs: dict[str, Any] = {}
    if name in ("erdos_renyi", "random_regular", "random_matching"):
        kwargs["seed"] = seed
    if name == "erdos_renyi":
        kwargs["p"] = min(1.0, 4.0 / max(n - 1, 1))
    if name == "random_regular":
        kwargs["degree"] = 4 if n > 4 else n - 1
    return topo_lib.by_name(name, n, **kwargs)


def load_data(config: RunConfig) -> data_lib.Dataset:
    """The configured dataset; unreadable files raise a ``ValueError`` naming ``data_dir``.

    Raises:
      ValueError: for an unknown name, a missing directory or unreadable / damaged files
        (``data_dir: cannot read ...``; ``dataset: ...`` for ``npz:PATH``).
      FileNotFoundError: for missing files.
    """
    try:
        return data_lib.load_dataset(config.dataset, config.data_dir)
    except (FileNotFoundError, ValueError):
        raise
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        where = "dataset" if config.dataset.startswith(data_lib.NPZ_PREFIX) else "data_dir"
        raise ValueError(f"{where}: cannot read the {config.dataset} files "
                         f"({type(err).__name__}: {err})") from err


def partition_nodes(config: RunConfig, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """The run's split of the train set over ``config.nodes`` nodes.

    ``config.partition`` names it (``resample`` starts from an IID split); a Dirichlet
    split is redrawn until every node holds at least one batch (``min_size=config.batch``).

    Args:
      config: the run.
      labels: ``[N]`` train labels.
      seed: seed of the split.

    Returns:
      ``n`` int64 index arrays into the train set.

    Raises:
      ValueError: when no Dirichlet draw gives every node a batch, naming the flags.
    """
    kind = "iid" if config.partition == "resample" else config.partition
    try:
        return data_lib.partition(kind, labels, config.nodes, seed=seed,
                                  samples_per_node=config.samples_per_node,
                                  alpha=config.alpha, min_size=config.batch)
    except ValueError as e:
        if kind != "dirichlet":
            raise
        raise ValueError(
            f"partition: no Dirichlet(alpha={config.alpha}) split of the {len(labels)} "
            f"training samples gives each of the {config.nodes} nodes one batch "
            f"({config.batch}); raise alpha (--alpha) or lower batch (--batch) or nodes "
            "(--nodes)") from e


def build(config: RunConfig, dtype: Any = None) -> Setup:
    """Loads data, partitions it, builds the model, the initial parameters and the graph.

    Nothing proportional to ``T`` is built: the batches are a stream (``Setup.source``).

    Args:
      config: the run.
      dtype: optional float dtype for parameters and inputs (``jnp.float64`` needs x64).

    Returns:
      A :class:`Setup`.
    """
    from dicejax.checkpoint import stream_source

    ds = load_data(config)
    n = config.nodes
    resample = config.partition == "resample"
    parts = partition_nodes(config, ds.y_train, config.seed)
    source = stream_source(ds.x_train, ds.y_train, parts, config.batch, seed=config.seed,
                           resample=resample,
                           samples_per_node=config.samples_per_node if resample else None)
    model = model_lib.get_model(config.model, ds.num_classes)
    key = jax.random.PRNGKey(config.seed)
    params = model_lib.init_params(model, key, ds.input_shape, num_nodes=n,
                                   same_init=config.same_init, dtype=dtype)
    test = data_lib.test_set(ds, config.test_size or None)
    probe = data_lib.probe_set(ds, config.probe_size, seed=config.seed)
    cast = _caster(dtype)
    return Setup(config, ds, model, model_lib.make_loss_fn(model), model_lib.make_eval_fn(model),
                 params, TypedSource(source, dtype), make_topology(config.topology, n, config.seed),
                 cached_optimizer(config.optimizer, config.lr), cast(test), cast(probe))


def _caster(dtype):
    def cast(batch):
        return {k: jnp.asarray(v, dtype if (dtype is not None and np.issubdtype(
            np.asarray(v).dtype, np.floating)) else None) for k, v in batch.items()}

    return cast


# --------------------------------------------------------------------------------------------
# Running a set-up along its stream (optionally checkpointed)
# --------------------------------------------------------------------------------------------


def concat_metrics(parts: Sequence[dict]) -> dict:
    """Per-step metrics of consecutive runs joined along the step axis (host arrays)."""
    parts = [jax.tree.map(np.asarray, jax.device_get(p)) for p in parts if p]
    if not parts:
        return {}
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


class Runner:
    """Advances a :class:`Setup`'s run along its batch stream, one chunk at a time.

    Memory is one chunk of batches plus one node state, whatever ``T`` is. With
    ``checkpoint_dir`` the unrecorded steps go through
    :func:`dicejax.checkpoint.run_checkpointed` (a checkpoint after every chunk; a later
    ``Runner`` on the same folder resumes from the newest one, bit-identically). Recorded
    windows (``record``) start from the current state and are never checkpointed.

    Args:
      setup: the built run.
      source: batch source (default ``setup.source``; e.g. an attacked stream).
      update_scale: optional ``[T, n]`` gates of the local updates (not checkpointable).
      chunk_steps: steps per chunk (default :func:`default_chunk_steps`).
      checkpoint_dir: checkpoint folder of the unrecorded steps, or None.
      evaluate: periodic evaluation on the test batch every ``config.eval_every`` steps.
      callback: ``callback(state, steps_done)`` after each chunk, ``steps_done`` global.

    Attributes:
      state: the :class:`~dicejax.simulate.NodeState` at ``position`` (None before step 0).
      position: global steps done.
      resumed_from: the step a checkpointed run resumed from (0 when it started afresh).
    """

    def __init__(self, setup: Setup, *, source: Callable[[int, int], dict] | None = None,
                 update_scale: np.ndarray | None = None, chunk_steps: int | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, evaluate: bool = True,
                 callback: Callable[[NodeState, int], None] | None = None):
        if checkpoint_dir is not None and update_scale is not None:
            raise ValueError("checkpoint_dir: runs with update gates (update_scale) cannot be "
                             "checkpointed")
        self.setup = setup
        self.source = setup.source if source is None else source
        self.update_scale = update_scale
        self.chunk_steps = chunk_steps or setup.chunk_steps
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.evaluate = bool(evaluate and setup.config.eval_every)
        self.callback = callback
        self.state: NodeState | None = None
        self.position = 0
        self.resumed_from = 0
        if self.checkpoint_dir is not None:
            from dicejax.checkpoint import latest_step

            self.resumed_from = min(latest_step(self.checkpoint_dir) or 0, setup.config.steps)
        self._metrics: list[dict] = []
        self._whole: dict | None = None  # checkpointed: metrics of [0, position)
        self._run_plan: RunPlan | None = None

    def _sim_kwargs(self) -> dict:
        s = self.setup
        return dict(eval_batch=s.test if self.evaluate else None,
                    eval_fn=s.eval_fn if self.evaluate else None,
                    eval_every=s.config.eval_every if self.evaluate else 0)

    def _chunk_callback(self, state, done):
        if self.callback is not None:
            self.callback(state, int(done))

    def _plan(self, first_chunk: dict) -> RunPlan:
        """The run's :class:`~dicejax.simulate.RunPlan`: validated once, on the first chunk."""
        if self._run_plan is None:
            s = self.setup
            self._run_plan = plan_run(s.loss_fn, s.params, first_chunk, s.topology,
                                      s.optimizer, update_scale=self.update_scale,
                                      consensus=True, **self._sim_kwargs())
            if self.state is None:
                self.state = self._run_plan.run_state
        return self._run_plan

    def _steps(self, stop: int, *, record: bool, evaluate: bool) -> Trajectory:
        """Runs ``[position, stop)`` chunk by chunk from ``state``; its trajectory."""
        outs, kept, kept_gates = [], [], []
        start, state = self.position, self.state
        for chunk in window_chunks(self.source, self.position, stop, self.chunk_steps):
            plan = self._plan(chunk)
            state = plan.run_state if state is None else state
            t_c = int(jax.tree.leaves(chunk)[0].shape[0])
            done = start + sum(int(o.loss.shape[0]) for o in outs)
            gates = plan.gates(done, t_c)
            before = state
            state, ys = plan.step(state, chunk, gates, record, evaluate)
            plan.check_divergence(before, state, chunk, gates, ys, done)
            outs.append(ys)
            if record:
                kept.append(chunk)
            if gates is not None:
                kept_gates.append(gates)
            if not record:
                self._chunk_callback(plan.host_state(state), done + t_c)
        initial = self.state if self.state is not None else self._run_plan.run_state
        return self._run_plan.trajectory(state, outs, kept, kept_gates, record,
                                         initial=self._run_plan.host_state(initial))

    def advance(self, stop: int) -> None:
        """Runs steps ``[position, stop)`` without recording."""
        if stop < self.position:
            raise ValueError(f"stop: {stop} is before the current step {self.position}")
        if stop == self.position:
            return
        s = self.setup
        if self.checkpoint_dir is not None:
            from dicejax.checkpoint import run_checkpointed

            traj = run_checkpointed(
                s.loss_fn, s.params, self.source, s.topology, s.optimizer,
                directory=self.checkpoint_dir, chunk_steps=self.chunk_steps, steps=stop,
                record=False, config=dataclasses.asdict(s.config), callback=self._chunk_callback,
                consensus=True, **self._sim_kwargs())
            self._whole = traj.metrics
        else:
            traj = self._steps(stop, record=False, evaluate=True)
            self._metrics.append(traj.metrics)
        self.state, self.position = final_state(traj), stop

    def record(self, stop: int, *, move: bool = False) -> Trajectory:
        """The recorded trajectory of steps ``[position, stop)`` (``start_step = position``).

        Args:
          stop: end step.
          move: continue from its end (its metrics, with the periodic evaluation, count as
            the run's); otherwise the runner stays where it is (for overlapping windows;
            no evaluation).
        """
        traj = self._steps(stop, record=True, evaluate=move)
        if move:
            if self._whole is not None:
                self._metrics, self._whole = [self._whole], None
            self._metrics.append(traj.metrics)
            self.state, self.position = final_state(traj), stop
            self._chunk_callback(self.state, stop)
        return traj

    def window(self, stop: int) -> Trajectory:
        """:meth:`record` of ``[position, stop)`` for influence, without moving, with the
        trajectory's ``start_step`` reduced modulo the graph's period
        (:func:`periodic_window`), so that every window compiles the influence functions
        once."""
        return periodic_window(self.record(stop))

    def metrics(self) -> dict:
        """Per-step metrics of steps ``[0, position)``: ``loss [T, n]``, ``consensus [T]``,
        ``eval`` (host arrays)."""
        if self._whole is not None:
            return concat_metrics([*self._metrics, self._whole])
        return concat_metrics(self._metrics)


def periodic_window(traj: Trajectory) -> Trajectory:
    """The trajectory with ``start_step`` reduced modulo its mixer's period.

    Influence functions use ``start_step`` only to pick the mixing matrix ``W^t`` (periodic
    in ``t``), so the scores are the same; but ``start_step`` is a static field of the
    trajectory, and windows that start at different steps would each compile the influence
    functions anew.
    """
    period = getattr(traj.mixer, "period", None)
    if not period:
        return traj
    return traj.replace(start_step=int(traj.start_step) % int(period))


class ResultStore:
    """Finished pieces of an experiment (a scored step, a seed, an arm) kept on disk.

    An interrupted command that is started again with the same folder skips every piece
    already stored. Pieces are pickled host data written atomically (temporary file, then
    rename); ``settings.json`` describes the experiment and a folder holding pieces of a
    different one is refused. Only open folders you wrote yourself (pickles run code).

    Args:
      directory: the folder (created if missing).
      settings: JSON-ready description of the experiment (configuration, options).

    Raises:
      ValueError: naming ``checkpoint_dir`` if the folder holds another experiment.
    """

    def __init__(self, directory: str | os.PathLike, settings: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(to_jsonable(settings), sort_keys=True))
        path = self.directory / "settings.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"checkpoint_dir: {str(path)!r} is unreadable ({err}); use "
                                 "a new folder") from err
            if stored != settings:
                differ = sorted(k for k in set(stored) | set(settings)
                                if stored.get(k) != settings.get(k))
                raise ValueError(f"checkpoint_dir: {str(self.directory)!r} holds results of a "
                                 f"different run ({', '.join(differ)} differ); rerun with the "
                                 "same options or use a new folder")
        else:
            save_json(path, settings)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pkl"

    def get(self, key: str) -> Any | None:
        """The stored piece, or None (absent or unreadable)."""
        try:
            with open(self._path(key), "rb") as f:
                return pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        """Stores a piece (host copies of its arrays) atomically."""
        value = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x,
                             value)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def subfolder(self, name: str) -> Path:
        """A folder inside the store (e.g. for a run's checkpoints)."""
        return self.directory / name


def training_summary(setup: Setup, params: Any, metrics: dict, seconds: float,
                     rate: float | None = None) -> dict:
    """JSON-ready summary of a finished run: per-node test accuracy and loss, curves.

    Args:
      setup: the run.
      params: final parameters, leaves ``[n, ...]``.
      metrics: per-step metrics of the whole run (``loss [T, n]``, ``consensus [T]``,
        optional ``eval``).
      seconds: wall time of the run.
      rate: measured node-steps per second (see :class:`Stopwatch`), or None.

    Returns:
      A dict; ``train_loss_curve [T]`` is the mean over nodes, ``train_loss_quantiles``
      ``{"min", "q25", "median", "q75", "max"}`` each ``[T]`` over nodes,
      ``consensus_distance [T]`` is ``(1/n) Σ_k ||θ_k − θ̄||²``.
    """
    from dicejax.simulate import evaluate_nodes

    config = setup.config
    fn = jax.jit(evaluate_nodes, static_argnums=0)
    final = {k: np.asarray(v) for k, v in fn(setup.eval_fn, params, setup.test).items()}
    curve = {}
    ev = metrics.get("eval")
    if ev is not None and len(np.asarray(ev["step"])):
        curve = {"step": np.asarray(ev["step"]),
                 "mean_accuracy": np.asarray(ev["accuracy"]).mean(axis=1),
                 "min_accuracy": np.asarray(ev["accuracy"]).min(axis=1),
                 "max_accuracy": np.asarray(ev["accuracy"]).max(axis=1),
                 "mean_loss": np.asarray(ev["loss"]).mean(axis=1)}
    loss = np.asarray(metrics["loss"], np.float64)  # [T, n]
    q = np.quantile(loss, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1)
    topo = setup.topology
    return {
        "config": config,
        "topology": {"name": topo.name, "spectral_gap": topo.spectral_gap,
                     "doubly_stochastic": topo.is_doubly_stochastic},
        "per_node_accuracy": final["accuracy"],
        "per_node_loss": final["loss"],
        "mean_accuracy": float(final["accuracy"].mean()),
        "min_accuracy": float(final["accuracy"].min()),
        "mean_loss": float(final["loss"].mean()),
        "eval_curve": curve,
        "train_loss_curve": loss.mean(axis=1),
        "train_loss_quantiles": dict(zip(("min", "q25", "median", "q75", "max"), q)),
        "consensus_distance": np.asarray(metrics["consensus"]),
        "wall_seconds": seconds,
        "node_steps_per_second": rate,
    }


def run_metadata(argv: Sequence[str] | None = None, seed: int | None = None,
                 prog: str = "dicejax") -> dict:
    """Provenance of a result: versions, date, the command line and the seed.

    Args:
      argv: the command's arguments (without the program name); None: ``sys.argv[1:]``.
      seed: the run's (first) seed.
      prog: the program name put in front of ``argv``.

    Returns:
      ``{"dicejax", "jax", "jaxlib", "python", "backend", "date", "command", "argv",
      "seed"}``; ``date`` is ISO 8601 with the UTC offset.
    """
    import importlib.metadata

    import dicejax

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        jaxlib = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        jaxlib = None
    return {
        "dicejax": dicejax.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([prog, *argv]),
        "argv": argv,
        "seed": seed,
    }


class Stopwatch:
    """Wall time of a loop's steps, excluding the first chunk (compilation).

    ``tick(done)`` after each chunk with the global steps done; ``rate`` is steps per second
    between the first and the last tick (None with fewer than two ticks).
    """

    def __init__(self):
        self.ticks: list[tuple[float, int]] = []

    def tick(self, done: int) -> None:
        self.ticks.append((time.perf_counter(), int(done)))

    @property
    def timed(self) -> tuple[float, int] | None:
        """``(seconds, steps)`` between the first and the last tick, or None."""
        if len(self.ticks) < 2 or self.ticks[-1][1] <= self.ticks[0][1]:
            return None
        (t0, s0), (t1, s1) = self.ticks[0], self.ticks[-1]
        return t1 - t0, s1 - s0


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Arrays to lists, numpy scalars to Python numbers, NaN to None, dataclasses to dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | jax.Array):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
