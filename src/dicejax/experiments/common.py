"""Shared set-up for experiments: a run configuration and everything built from it.

Experiments compose the core (topology, simulate, influence) with data and models; they
return plain data (dicts of numbers and arrays) that the CLI prints and plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicejax import data as data_lib
from dicejax import models as model_lib
from dicejax import topology as topo_lib

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
      alpha: Dirichlet concentration for ``partition="dirichlet"``.
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


class Setup(NamedTuple):
    """What a :class:`RunConfig` builds."""

    config: RunConfig
    dataset: data_lib.Dataset
    model: Any
    loss_fn: Callable
    eval_fn: Callable
    params: Any  # leaves [n, ...]
    batches: dict  # leaves [T, n, B, ...]
    topology: topo_lib.Topology
    optimizer: optax.GradientTransformation
    test: dict  # [M, ...]
    probe: dict  # [P, ...]


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
        topo = topo_lib.load_csv(name)
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


def build(config: RunConfig, dtype: Any = None) -> Setup:
    """Loads data, partitions it, builds the model, the initial parameters and the graph.

    Args:
      config: the run.
      dtype: optional float dtype for parameters and inputs (``jnp.float64`` needs x64).

    Returns:
      A :class:`Setup`.
    """
    ds = data_lib.load_dataset(config.dataset, config.data_dir)
    n = config.nodes
    resample = config.partition == "resample"
    kind = "iid" if resample else config.partition
    parts = data_lib.partition(kind, ds.y_train, n, seed=config.seed,
                               samples_per_node=config.samples_per_node, alpha=config.alpha)
    batches = data_lib.node_batches(
        ds.x_train, ds.y_train, parts, config.steps, config.batch, seed=config.seed,
        resample=resample, samples_per_node=config.samples_per_node if resample else None)
    model = model_lib.get_model(config.model, ds.num_classes)
    key = jax.random.PRNGKey(config.seed)
    params = model_lib.init_params(model, key, ds.input_shape, num_nodes=n,
                                   same_init=config.same_init, dtype=dtype)
    test = data_lib.test_set(ds, config.test_size or None)
    probe = data_lib.probe_set(ds, config.probe_size, seed=config.seed)
    cast = _caster(dtype)
    return Setup(config, ds, model, model_lib.make_loss_fn(model), model_lib.make_eval_fn(model),
                 params, cast(batches), make_topology(config.topology, n, config.seed),
                 cached_optimizer(config.optimizer, config.lr), cast(test), cast(probe))


def _caster(dtype):
    def cast(batch):
        return {k: jnp.asarray(v, dtype if (dtype is not None and np.issubdtype(
            np.asarray(v).dtype, np.floating)) else None) for k, v in batch.items()}

    return cast


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
