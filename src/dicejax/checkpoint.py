"""Checkpoint and resume of long runs, bit-identical to an uninterrupted run.

:func:`run_checkpointed` runs what :func:`dicejax.simulate` runs (the same
:class:`~dicejax.simulate.RunPlan`: one validation, then :func:`dicejax.run` chunk by chunk)
and, every ``every_chunks`` chunks, commits to ``directory``:

* the :class:`~dicejax.simulator.NodeState` after the chunk — parameters ``θ^t``, every
  node's optimizer state, the global step ``t``. The step is also the *data position*: the
  batches are a deterministic function of ``(seed, step)`` (a :data:`BatchSource`, e.g.
  :func:`stream_source` over :mod:`dicejax.data`'s per-node streams), so nothing else is
  needed to regenerate the next chunk;
* the run's outputs since the previous commit (a *history segment*): the metrics and, with
  ``record=True``, the recorded trajectory ``θ``, ``θ^{½}``, optimizer states and batches.

If the process dies, the same call (or :func:`resume`) continues from the newest complete
checkpoint and returns a :class:`~dicejax.trajectory.Trajectory` that is bit-identical to
``simulate`` over the whole run on the same machine and jax/jaxlib version (see
``docs/reliability.md``).

Layout of ``directory`` (one writer at a time)::

  run.json          what run this is (shapes, dtypes and digest of θ^0 and its optimizer
                    state, digests of the topology, data and evaluation batch, ``config``);
                    a resume with different inputs is refused with a ValueError
  state/<t>/        Orbax checkpoint: NodeState after step t (newest ``keep`` kept)
  history/<t>/      Orbax checkpoint: metrics (+ recorded arrays) of steps [start, t)
  ignored/          unreadable checkpoints set aside on resume (kept for inspection)

**Why Orbax.** The array pytrees are written with Orbax (``orbax-checkpoint``, which flax
brings), the JAX ecosystem's maintained checkpoint library: it commits each checkpoint as a
temporary directory renamed into place (atomic on a local file system), stores arrays in a
standard format (tensorstore/zarr) and restores them byte-exact (checked here for float64,
float32, int32, 0-d leaves). It works offline. We hand it host (numpy) copies of every leaf,
flattened to ``{index: array}`` with the pytree paths, shapes and dtypes in a JSON item next
to them: restores then need no device or sharding information from the saving machine, work
for any pytree (optax's NamedTuple states, empty ``EmptyState`` nodes) and are checked
against the live run's structure. Orbax refuses zero-size arrays, so those are rebuilt from
the JSON description. We do not use ``orbax.CheckpointManager``: it silently skips saving a
step lower than the newest one on disk, which after falling back past an unreadable
checkpoint would lose the resumed run; listing, retention and fallback live here instead.
Each checkpoint also carries a SHA-256 of its arrays, verified on restore, so a checkpoint
whose files were damaged after commit is detected and skipped rather than resumed silently.

Guarantees: a process killed at any point (SIGKILL included, even while writing) leaves the
directory resumable from the newest committed checkpoint; temporary directories of
interrupted writes are removed; a checkpoint that fails to restore or to verify is moved to
``ignored/`` with a ``RuntimeWarning`` and the next older one is used. Durability against
power loss depends on Orbax's and the file system's syncing and was not tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dicejax import data as data_lib
from dicejax import topology as topo_lib
from dicejax.mixing import Method
from dicejax.simulate import init, plan_run
from dicejax.simulator import DEFAULT_OPTIMIZER, LossFn, NodeState
from dicejax.trajectory import Trajectory

PyTree = Any

__all__ = [
    "ArraySource",
    "BatchSource",
    "StreamSource",
    "array_source",
    "latest_step",
    "restore_state",
    "resume",
    "run_checkpointed",
    "run_setup",
    "stream_source",
]

FORMAT = 1
"""Version of the on-disk layout; bumped on incompatible changes."""

_STATE, _HISTORY, _IGNORED, _RUN = "state", "history", "ignored", "run.json"
_TMP_MARK = ".orbax-checkpoint-tmp"
_RECORDED = ("params", "half_params", "opt_states", "batches")

BatchSource = Callable[[int, int], PyTree]
"""``source(start, stop)`` -> the batches of global steps ``start .. stop-1``, leaves
``[stop - start, n, B, ...]``. Must be a deterministic function of ``(start, stop)``: a
resumed run regenerates the chunk it was killed in from its step alone."""


# --------------------------------------------------------------------------------------------
# Batch sources
# --------------------------------------------------------------------------------------------


class ArraySource(NamedTuple):
    """Windows of an in-memory batch pytree (leaves ``[T, n, B, ...]``).

    Attributes:
      batches: pytree, every leaf ``[T, n, B, ...]``.
    """

    batches: PyTree

    def __call__(self, start: int, stop: int) -> PyTree:
        def window(x):
            if isinstance(x, jax.Array):  # one compilation per window length, not per start
                return _window(x, start, stop - start)
            return np.asarray(x)[start:stop]

        return jax.tree.map(window, self.batches)

    @property
    def num_steps(self) -> int:
        """``T``."""
        return int(jnp.shape(jax.tree.leaves(self.batches)[0])[0])

    def spec(self) -> dict:
        """JSON description (shapes, dtypes, SHA-256 of the contents) for ``run.json``."""
        return {"kind": "arrays", "leaves": _describe(self.batches),
                "sha256": _digest(jax.tree.leaves(self.batches))}


@functools.partial(jax.jit, static_argnums=2)
def _window(x: jax.Array, start, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


class StreamSource(NamedTuple):
    """Random-access windows of :func:`dicejax.data.node_batches`' per-node stream.

    ``source(a, b)`` equals ``node_batches(x, y, parts, T, batch_size, ...)[a:b]`` for any
    ``T >= b``, computed without generating steps before ``a`` (the stream is drawn from one
    generator per node and block of epochs, derived from ``seed``).
    """

    x: np.ndarray
    y: np.ndarray
    stream: Any  # the validated stream description of dicejax.data

    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        idx = data_lib.stream_indices(self.stream, start, stop)
        return data_lib.gather_batches(self.x, self.y, idx)

    def spec(self) -> dict:
        """JSON description (seed, sizes, SHA-256 of the data and parts) for ``run.json``."""
        s = self.stream
        return {"kind": "stream", "seed": s.seed, "batch_size": s.batch_size,
                "resample": s.resample, "draws": [int(d) for d in s.draws],
                "x": _describe(self.x), "y": _describe(self.y),
                "sha256": _digest([self.x, self.y, *s.parts])}


def array_source(batches: PyTree) -> ArraySource:
    """A :data:`BatchSource` slicing an in-memory batch pytree (leaves ``[T, n, B, ...]``).

    Raises:
      ValueError: if ``batches`` has no leaves or its leaves disagree on ``T``.
    """
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches: must be a pytree with at least one array leaf")
    lengths = sorted({str(jnp.shape(x)[0]) if jnp.ndim(x) else "none" for x in leaves})
    if len(lengths) != 1 or lengths == ["none"]:
        raise ValueError(f"batches: leaves disagree on the leading axis T: {lengths}")
    return ArraySource(batches)


def stream_source(
    x: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    resample: bool = False,
    samples_per_node: int | None = None,
) -> StreamSource:
    """A :data:`BatchSource` over :func:`dicejax.data.node_batches`' stream, random access.

    Args:
      x, y, parts, batch_size, seed, resample, samples_per_node: as in
        :func:`dicejax.data.node_batches`.

    Returns:
      A :class:`StreamSource`; ``source(a, b)`` is ``{'x': [b-a, n, B, ...] float32,
      'y': [b-a, n, B] int32}``.

    Raises:
      ValueError: for the arguments :func:`dicejax.data.node_batches` rejects.
    """
    x, y = np.asarray(x), np.asarray(y)
    stream = data_lib.check_stream(x, y, parts, 1, batch_size, seed, resample, samples_per_node)
    return StreamSource(x, y, stream)


# --------------------------------------------------------------------------------------------
# Packing pytrees for Orbax
# --------------------------------------------------------------------------------------------


def _describe(tree: PyTree) -> list[dict]:
    """``[{"path", "shape", "dtype"[, "keys"]}]`` of every leaf, in flattening order.

    ``keys`` (the dict keys along the path) is present when the path is made of str dict keys
    only, so that nested dicts (metrics) can be rebuilt without a template.
    """
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        leaf = {"path": jax.tree_util.keystr(path), "shape": [int(s) for s in np.shape(x)],
                "dtype": np.dtype(dtype).name}
        if all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for k in path):
            leaf["keys"] = [k.key for k in path]
        out.append(leaf)
    return out


def _digest(leaves: Sequence[Any]) -> str:
    """SHA-256 over the dtype, shape and bytes of every leaf."""
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _pack(fields: Mapping[str, PyTree]) -> tuple[dict, dict]:
    """Host copies of every leaf as ``{field: {index: array}}`` plus their description."""
    arrays: dict[str, dict[str, np.ndarray]] = {}
    spec: dict[str, list[dict]] = {}
    leaves: list[np.ndarray] = []
    for name, tree in fields.items():
        host = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(tree))]
        spec[name] = _describe(tree)
        arrays[name] = {f"{i:05d}": a for i, a in enumerate(host) if a.size}
        leaves.extend(host)
    return {k: v for k, v in arrays.items() if v}, {"leaves": spec, "sha256": _digest(leaves)}


def _unpack(arrays: Mapping, meta: Mapping, templates: Mapping[str, Any],
            extra_axes: int = 0) -> dict[str, PyTree]:
    """Inverse of :func:`_pack`; checks paths, dtypes, shapes and the digest.

    ``templates[field]`` is a pytree with the field's structure, dtypes and shapes (stored
    leaves have ``extra_axes`` more leading axes, e.g. the step axis of recorded arrays), or
    None for nested dicts of arrays rebuilt from their keys (metrics).
    """
    out, leaves = {}, []
    for name, spec in meta["leaves"].items():
        stored = arrays.get(name, {})
        values = []
        for i, leaf in enumerate(spec):
            dtype = jnp.dtype(leaf["dtype"])
            a = stored.get(f"{i:05d}")
            a = np.zeros(leaf["shape"], dtype) if a is None else np.asarray(a)
            if list(a.shape) != leaf["shape"] or a.dtype != dtype:
                raise ValueError(f"{name}{leaf['path']}: stored {a.shape} {a.dtype}, "
                                 f"described as {leaf['shape']} {leaf['dtype']}")
            values.append(a)
        leaves.extend(values)
        template = templates.get(name)
        if template is None:
            out[name] = _nested_dict([leaf["keys"] for leaf in spec], values)
            continue
        got = [(s["path"], s["dtype"], s["shape"][extra_axes:]) for s in spec]
        want = [(s["path"], s["dtype"], s["shape"]) for s in _describe(template)]
        if got != want:
            raise ValueError(f"{name}: stored leaves {got} do not match this run's {want}")
        out[name] = jax.tree.unflatten(jax.tree.structure(template), values)
    if _digest(leaves) != meta["sha256"]:
        raise ValueError("arrays do not match their SHA-256 (damaged files)")
    return out


def _nested_dict(paths: list[list[str]], values: list[np.ndarray]) -> dict:
    """Rebuilds a nested dict from the key path of every leaf."""
    out: dict = {}
    for keys, value in zip(paths, values):
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Directory handling
# --------------------------------------------------------------------------------------------


def _check_directory(directory: Any) -> Path:
    if not isinstance(directory, str | os.PathLike) or not str(directory):
        raise ValueError(f"directory: must be a non-empty str or os.PathLike, got {directory!r}")
    path = Path(directory).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"directory: {str(path)!r} exists and is not a directory")
    return path


def _steps(folder: Path) -> list[int]:
    """Committed checkpoint steps in ``folder`` (names that are all digits), ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def _remove_temporaries(directory: Path) -> None:
    """Deletes what interrupted writes left behind (Orbax temporaries, our temp files)."""
    for folder in (directory / _STATE, directory / _HISTORY):
        if folder.is_dir():
            for p in folder.iterdir():
                if _TMP_MARK in p.name:
                    shutil.rmtree(p, ignore_errors=True)
    for p in directory.glob(f".{_RUN}.*.tmp"):
        p.unlink(missing_ok=True)


def _set_aside(path: Path, reason: str) -> None:
    target = path.parent.parent / _IGNORED / f"{path.parent.name}-{path.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{path.parent.name}-{path.name}.{suffix}")
    warnings.warn(f"checkpoint {str(path)!r} is unreadable ({reason}); moved to "
                  f"{str(target)!r} and ignored", RuntimeWarning, stacklevel=4)
    shutil.move(str(path), str(target))


def _write_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(ck: ocp.Checkpointer, path: Path, arrays: dict, meta: dict) -> None:
    items = {"meta": ocp.args.JsonSave(meta)}
    if arrays:
        items["arrays"] = ocp.args.StandardSave(arrays)
    ck.save(path, args=ocp.args.Composite(**items))


def _load(ck: ocp.Checkpointer, path: Path) -> tuple[dict, dict]:
    meta = ck.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"unknown checkpoint format {str(meta)[:80]}")
    if not any(math.prod(s["shape"]) for specs in meta["leaves"].values() for s in specs):
        return {}, meta
    arrays = ck.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))
    return arrays["arrays"], meta


def _read_meta(ck: ocp.Checkpointer, path: Path) -> dict | None:
    try:
        meta = ck.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # any failure: not a readable checkpoint
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def latest_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest committed checkpoint in ``directory`` (None if there is none).

    Only the checkpoint's JSON item is read; :func:`run_checkpointed` also verifies the
    arrays and may fall back to an older checkpoint.
    """
    directory = _check_directory(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        for step in reversed(_steps(directory / _STATE)):
            if _read_meta(ck, directory / _STATE / str(step)) is not None:
                return step
    return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _strong(tree: PyTree) -> PyTree:
    """Device arrays without weak types (a restored leaf is never weakly typed)."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


def _host_concat(parts: list[PyTree], drop_first: bool = False) -> PyTree:
    """Concatenates host copies along axis 0 (numpy: no XLA compilation per shape).

    With ``drop_first`` every part after the first loses its first entry (the state at a
    boundary, which ends one part and starts the next).
    """
    parts = [jax.tree.map(np.asarray, jax.device_get(p)) for p in parts]
    if drop_first:
        parts = parts[:1] + [jax.tree.map(lambda x: x[1:], p) for p in parts[1:]]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


class _Segment(NamedTuple):
    """Outputs of steps ``[start, stop)``: metrics and (record=True) recorded arrays."""

    start: int
    stop: int
    fields: dict  # "metrics" and, recorded, "params" [L+1], "half_params" [L], ...


def _segment(trajs: list[Trajectory], record: bool) -> _Segment:
    """Joins consecutive chunk trajectories (θ^t and s^t of a boundary appear once)."""
    fields = {"metrics": _host_concat([t.metrics for t in trajs])}
    if record:
        for name in _RECORDED:
            fields[name] = _host_concat([getattr(t, name) for t in trajs],
                                        drop_first=name in ("params", "opt_states"))
    start = trajs[0].start_step
    return _Segment(start, start + sum(t.num_steps for t in trajs), fields)


def _join(segments: list[_Segment], record: bool) -> dict:
    """Fields of the whole run from its segments, in order, as device arrays."""
    names = ("metrics", *_RECORDED) if record else ("metrics",)
    out = {name: _host_concat([s.fields[name] for s in segments],
                              drop_first=name in ("params", "opt_states")) for name in names}
    return jax.tree.map(jnp.asarray, out)


def _fingerprint(state: NodeState, topo, source, record: bool, eval_every: int,
                 eval_batch, config, consensus: bool = True) -> dict:
    matrix = topo.stacked() if isinstance(topo, topo_lib.Topology) else np.asarray(topo)
    spec = getattr(source, "spec", None)
    # runs without the per-step consensus metric are marked; runs with it keep the
    # fingerprint of the checkpoints written before it became optional (they all had it)
    extra = {} if consensus else {"consensus": False}
    return {
        **extra,
        "format": FORMAT,
        "nodes": int(jax.tree.leaves(state.params)[0].shape[0]),
        "record": bool(record),
        "initial_state": {"leaves": _describe(state), "sha256": _digest(jax.tree.leaves(state))},
        "topology": {"shape": list(matrix.shape), "sha256": _digest([matrix])},
        "data": spec() if callable(spec) else {"kind": "callable"},
        "eval": {"every": int(eval_every),
                 "sha256": None if eval_batch is None else _digest(jax.tree.leaves(eval_batch))},
        "config": config,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend()},
    }


def _check_fingerprint(directory: Path, expected: dict) -> None:
    """Refuses a directory whose committed checkpoints belong to a different run."""
    path = directory / _RUN
    committed = _steps(directory / _STATE) or _steps(directory / _HISTORY)
    if not committed:  # nothing to protect yet: (re)describe this run
        _write_json(path, expected)
        return
    expected = dict(expected)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"directory: {str(path)!r} is unreadable ({err}); use a new "
                         "directory or delete this one") from err
    env, stored_env = expected.pop("environment"), stored.pop("environment", None)
    if stored_env != env:
        warnings.warn(f"directory: {str(directory)!r} was written with {stored_env}, this process"
                      f" runs {env}; the resumed run may differ in the last bits from an "
                      "uninterrupted one", RuntimeWarning, stacklevel=3)
    differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
    if differ:
        raise ValueError(
            f"directory: {str(directory)!r} holds checkpoints of a different run "
            f"({', '.join(differ)} differ); pass the same parameters, optimizer state, topology,"
            f" data, record/eval settings and config, or use a new directory")


def _check_config(config: Any) -> Any:
    if config is None:
        return None
    try:
        return json.loads(json.dumps(config, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: must be JSON-serialisable, got {config!r:.80}: {err}") from err


def _source_chunk(source: BatchSource, start: int, stop: int) -> PyTree:
    """``source(start, stop)``, checked to have ``stop - start`` steps."""
    chunk = source(start, stop)
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(chunk)}
    if lengths != {stop - start}:
        raise ValueError(f"batches: source({start}, {stop}) returned leading axes "
                         f"{sorted(map(str, lengths))}, expected {stop - start}")
    return chunk


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


class _Resumed(NamedTuple):
    state: NodeState
    segments: list[_Segment]


def _restore_point(ck, directory: Path, template: NodeState, templates: dict,
                   record: bool) -> _Resumed | None:
    """The newest state checkpoint that verifies and whose history tiles [0, t)."""
    for step in reversed(_steps(directory / _STATE)):
        path = directory / _STATE / str(step)
        try:
            arrays, meta = _load(ck, path)
            state = _unpack(arrays, meta, {"state": template})["state"]
            if meta.get("step") != step or int(state.step) != step:
                raise ValueError(f"holds step {int(state.step)}")
        except Exception as err:  # unreadable, whatever the reason
            _set_aside(path, f"{type(err).__name__}: {err}")
            continue
        segments = _history(ck, directory, step, templates, record)
        if segments is not None:
            return _Resumed(_strong(state), segments)
        warnings.warn(f"checkpoint at step {step} has an incomplete history; trying an older "
                      "one", RuntimeWarning, stacklevel=3)
    return None


def _history(ck, directory: Path, stop: int, templates: dict,
             record: bool) -> list[_Segment] | None:
    """Loads the history segments that tile ``[0, stop)``; None if they do not."""
    folder = directory / _HISTORY
    metas = {}
    for key in _steps(folder):
        if key <= stop:
            meta = _read_meta(ck, folder / str(key))
            if meta is None:
                _set_aside(folder / str(key), "its JSON item does not restore")
            else:
                metas[key] = meta
    segments, pos = [], 0
    while pos < stop:
        key = next((k for k, m in sorted(metas.items()) if m.get("start") == pos), None)
        if key is None:
            return None
        try:
            arrays, meta = _load(ck, folder / str(key))
            wanted = {"metrics": None, **({n: templates[n] for n in _RECORDED} if record else {})}
            if set(meta["leaves"]) != set(wanted):
                raise ValueError(f"holds {sorted(meta['leaves'])}, expected {sorted(wanted)}")
            if (meta.get("start"), meta.get("stop")) != (pos, key):
                raise ValueError(f"describes steps [{meta.get('start')}, {meta.get('stop')})")
            fields = _unpack(arrays, meta, wanted, extra_axes=1)
        except Exception as err:  # unreadable, whatever the reason
            _set_aside(folder / str(key), f"{type(err).__name__}: {err}")
            return None
        segments.append(_Segment(pos, key, fields))
        pos = key
    return segments if pos == stop else None


def _delete(path: Path) -> None:
    """Deletes a checkpoint; renamed to a temporary name first, so that a kill half-way
    leaves something :func:`_remove_temporaries` cleans up, never a half-deleted checkpoint."""
    doomed = path.with_name(f"{path.name}{_TMP_MARK}-deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _discard_after(directory: Path, step: int) -> None:
    """Deletes committed checkpoints past ``step`` (recomputed identically after resuming)."""
    for folder in (directory / _STATE, directory / _HISTORY):
        for key in _steps(folder):
            if key > step:
                _delete(folder / str(key))


def _prune(directory: Path, keep: int) -> None:
    for key in _steps(directory / _STATE)[:-keep]:
        _delete(directory / _STATE / str(key))


def run_checkpointed(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | BatchSource,
    topo: topo_lib.Topology | jax.Array | np.ndarray,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    *,
    directory: str | os.PathLike,
    chunk_steps: int,
    steps: int | None = None,
    every_chunks: int = 1,
    keep: int = 2,
    record: bool = False,
    config: Mapping[str, Any] | None = None,
    eval_batch: PyTree | None = None,
    eval_fn: Callable[[PyTree, PyTree], dict] | None = None,
    eval_every: int = 0,
    mixing: Method = "auto",
    check_finite: bool = True,
    callback: Callable[[NodeState, int], None] | None = None,
    consensus: bool = False,
    _require_checkpoint: bool = False,
) -> Trajectory:
    """:func:`dicejax.simulate` in chunks, committing a checkpoint every ``every_chunks``.

    Starts from ``params`` when ``directory`` holds no checkpoint, otherwise continues from
    the newest complete one. The result is the :class:`~dicejax.simulate.Trajectory` of the
    whole run, bit-identical to ``simulate(loss_fn, params, all_batches, topo, optimizer,
    record=record, ...)`` however often the run was interrupted and resumed (same machine,
    same jax/jaxlib; leaves of ``params`` that are weakly typed are made strongly typed first,
    as a restored leaf would be).

    Args:
      loss_fn: one node's loss ``loss_fn(params, batch) -> scalar``.
      params: ``θ^0``, pytree with leaves ``[n, ...]``. On resume it must equal the
        checkpointed run's ``θ^0`` (checked by digest); its structure types the restore.
      batches: the data: a pytree with leaves ``[T, n, B, ...]`` or a :data:`BatchSource`
        ``source(start, stop)`` (e.g. :func:`stream_source`), a deterministic function of the
        global step.
      topo: as in :func:`dicejax.simulate` (a Topology or a concrete ``[n, n]`` /
        ``[T, n, n]`` array).
      optimizer: optax transformation. It is not stored: resume with the same one.
      directory: where checkpoints live (created if missing). One writer at a time.
      chunk_steps: steps per ``simulate`` call (one ``lax.scan``); results do not depend on
        it, so it may change between resumes.
      steps: total steps ``T`` (default: the leading axis of array ``batches``; required for
        a source). With a source it may be raised on a later call to extend a finished run.
      every_chunks: commit a checkpoint after every this many chunks (and after the last).
      keep: number of newest state checkpoints kept (>= 1; 2 survives a damaged newest one).
      record: record the trajectory (``θ^t``, ``θ^{t+½}``, optimizer states, batches), as
        ``simulate(record=True)``; stored on disk in history segments. Default False (long
        runs), unlike ``simulate``.
      config: JSON-serialisable description of the run (e.g. hyper-parameters the
        optimizer closes over); a resume with a different ``config`` is refused.
      eval_batch, eval_fn, eval_every, mixing, check_finite, consensus: as in
        :func:`dicejax.simulate` (a resume must keep ``consensus``).
      callback: ``callback(state, step)`` on the host after each chunk (after its checkpoint
        is committed, if one was due); ``step`` is the global number of steps done.

    Returns:
      The :class:`~dicejax.simulate.Trajectory` of steps ``0 .. T-1``.

    Raises:
      ValueError: for bad arguments, or a ``directory`` holding checkpoints of a different
        run (other ``θ^0``, optimizer-state structure, topology, data, record or evaluation
        settings, or ``config``), or a checkpoint past ``steps``.
      FloatingPointError: when the run diverges (``check_finite``); the checkpoints
        committed before the diverging chunk stay valid.

    Warns:
      RuntimeWarning: when a checkpoint is unreadable or damaged and an older one is used.
    """
    directory = _check_directory(directory)
    chunk_steps = _positive(chunk_steps, "chunk_steps")
    every_chunks = _positive(every_chunks, "every_chunks")
    keep = _positive(keep, "keep")
    if not isinstance(record, bool):
        raise ValueError(f"record: must be a bool, got {record!r}")
    config = _check_config(config)
    source = batches if callable(batches) else array_source(batches)
    if steps is None:
        if not isinstance(source, ArraySource):
            raise ValueError("steps: required when batches is a BatchSource")
        steps = source.num_steps
    steps = _positive(steps, "steps")
    if isinstance(source, ArraySource) and steps > source.num_steps:
        raise ValueError(f"steps: {steps} exceeds the T = {source.num_steps} steps of batches")
    if isinstance(topo, jax.core.Tracer):
        raise ValueError("topo: checkpointed runs need a concrete topology, got a traced array")
    leaves = jax.tree.leaves(params)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("params: must be a pytree of arrays with a leading node axis n")
    initial = _strong(init(params, optimizer))
    # validates topo, the mixing method, the loss and the evaluation once, before any work
    plan = plan_run(loss_fn, initial.params, _source_chunk(source, 0, min(chunk_steps, steps)),
                    topo, optimizer,
                    eval_batch=eval_batch, eval_fn=eval_fn, eval_every=eval_every,
                    mixing=mixing, initial_state=initial, consensus=consensus)

    directory.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(directory)
    _check_fingerprint(directory, _fingerprint(initial, topo, source, record, eval_every,
                                               eval_batch, config, consensus))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        templates = {}
        if record:
            templates = {"params": initial.params, "half_params": initial.params,
                         "opt_states": initial.opt_state,
                         "batches": jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                             np.shape(x)[1:], x.dtype), source(0, 1))}
        resumed = _restore_point(ck, directory, initial, templates, record)
        if resumed is None:
            if _require_checkpoint:
                raise FileNotFoundError(f"directory: no complete checkpoint in {str(directory)!r}")
            state, segments = initial, []
        else:
            state, segments = resumed
        done = int(state.step)
        if done > steps:
            raise ValueError(f"steps: {steps} is less than the {done} steps already checkpointed "
                             f"in {str(directory)!r}")
        _discard_after(directory, done)
        pending: list[Trajectory] = []
        chunks = 0
        while done < steps:
            stop = min(done + chunk_steps, steps)
            chunk = _source_chunk(source, done, stop)
            start_state = state
            state, ys = plan.step(state, chunk, None, record)
            if check_finite:
                plan.check_divergence(start_state, state, chunk, None, ys, done)
            traj = plan.trajectory(state, [ys], [chunk], [], record, initial=start_state)
            state, done, chunks = traj.final_state, stop, chunks + 1
            pending.append(traj)
            if chunks % every_chunks == 0 or done == steps:
                segment = _segment(pending, record)
                arrays, meta = _pack(segment.fields)
                meta.update(format=FORMAT, start=segment.start, stop=segment.stop)
                _save(ck, directory / _HISTORY / str(segment.stop), arrays, meta)
                arrays, meta = _pack({"state": state})
                meta.update(format=FORMAT, step=done)
                _save(ck, directory / _STATE / str(done), arrays, meta)
                _prune(directory, keep)
                segments.append(segment)
                pending = []
            if callback is not None:
                callback(state, done)
    fields = _join(segments, record)
    states = None
    if record:
        steps = jnp.arange(jax.tree.leaves(fields["params"])[0].shape[0], dtype=jnp.int32)
        states = NodeState(fields["params"], fields["opt_states"], steps)
    return Trajectory(plan.sim, state, fields["metrics"], states, fields.get("half_params"),
                      batches=fields.get("batches"))


def resume(
    directory: str | os.PathLike,
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree | BatchSource,
    topo: topo_lib.Topology | jax.Array | np.ndarray,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
    **kwargs: Any,
) -> Trajectory:
    """Continues the run checkpointed in ``directory`` (see :func:`run_checkpointed`).

    Takes the same arguments as :func:`run_checkpointed` (``params`` is ``θ^0`` of the run,
    used to type and check the restore). Temporary or damaged checkpoints are ignored.

    Raises:
      FileNotFoundError: if ``directory`` holds no complete checkpoint.
      ValueError: as :func:`run_checkpointed`.
    """
    directory = _check_directory(directory)
    if not (directory / _RUN).exists():
        raise FileNotFoundError(f"directory: no checkpointed run in {str(directory)!r}")
    return run_checkpointed(loss_fn, params, batches, topo, optimizer, directory=directory,
                            _require_checkpoint=True, **kwargs)


def restore_state(
    directory: str | os.PathLike,
    params: PyTree,
    optimizer: optax.GradientTransformation = DEFAULT_OPTIMIZER,
) -> NodeState | None:
    """The :class:`~dicejax.simulate.NodeState` of the newest verifiable state checkpoint.

    Args:
      directory: a :func:`run_checkpointed` directory.
      params: pytree with the structure and dtypes of the run's parameters (leaves
        ``[n, ...]``; values unused).
      optimizer: the run's optimizer (its state structure types the restore).

    Returns:
      The state (``state.step`` is the global step), or None if none verifies. Unlike
      :func:`run_checkpointed`, nothing in ``directory`` is moved or deleted.
    """
    directory = _check_directory(directory)
    template = _strong(init(params, optimizer))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        for step in reversed(_steps(directory / _STATE)):
            with contextlib.suppress(Exception):
                arrays, meta = _load(ck, directory / _STATE / str(step))
                return _strong(_unpack(arrays, meta, {"state": template})["state"])
    return None


def run_setup(
    setup: Any,
    directory: str | os.PathLike,
    *,
    chunk_steps: int | None = None,
    every_chunks: int = 1,
    record: bool = False,
    callback: Callable[[NodeState, int], None] | None = None,
) -> Trajectory:
    """Checkpointed training of a :class:`dicejax.experiments.common.Setup` (for the CLI).

    Runs exactly what :func:`dicejax.experiments.train.train` runs (same batches, topology,
    optimizer and periodic evaluation), with the run's :class:`RunConfig`
    as the checkpoint's ``config``. A second call with the same directory
    resumes. The batches come from ``setup.source``, generated chunk by chunk (memory does
    not grow with ``T``); the checkpoint's ``run.json`` digests the data set and the stream's
    seed, not the batches, so nothing is hashed up front.

    Args:
      setup: from :func:`dicejax.experiments.common.build`.
      directory: checkpoint directory (e.g. ``dicejax train --checkpoint-dir``).
      chunk_steps: steps per chunk (default ``setup.chunk_steps``: a twentieth of the run,
        at most 64 MiB of batches).
      every_chunks, record, callback: as in :func:`run_checkpointed`.

    Returns:
      The :class:`~dicejax.simulate.Trajectory` of the whole run.
    """
    config = setup.config
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return run_checkpointed(
        setup.loss_fn, setup.params, setup.source, setup.topology, setup.optimizer,
        directory=directory, chunk_steps=chunk_steps or setup.chunk_steps,
        steps=config.steps, every_chunks=every_chunks, record=record, config=settings,
        eval_batch=setup.test, eval_fn=setup.eval_fn if config.eval_every else None,
        eval_every=config.eval_every, callback=callback, consensus=True)
