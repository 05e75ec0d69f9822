"""Memory budgets for per-source influence computations: sources per chunk from bytes per source.

Every per-source function (``gt_cascade``, ``e_cascade``, ``dice_gt``, ``dice_e``) ``vmap``s a
re-run over its sources. Without ``batch_size``, the number of sources per chunk is the
largest that keeps :func:`source_bytes` times the chunk within the memory budget
(``memory_budget=`` bytes, default :data:`DEFAULT_FRACTION` of the memory still free on the
device: on CPU ``MemAvailable`` of ``/proc/meminfo``, on an accelerator its allocator's
limit minus what is in use). When even one source does not fit, a ``ValueError`` says how
much it needs.

The estimate counts, per source, the largest hop of its re-run: the local updates of the
nodes it has reached (their states, gradients, new optimizer states and the activations the
backward pass keeps), the gossiped states of the next hop and the probe evaluations of the
reached nodes; DICE-E counts twice (a tangent beside every primal value). It is only the
first guess, and a conservative one (XLA fuses and reuses most of those buffers: measured
4-19x more than the program needs, ``benchmarks/RESULTS.md`` §5).

What decides is XLA's own buffer assignment of the compiled chunk program
(:func:`compiled_bytes`: its temporary and output buffers; the recorded trajectory it reads
is already resident): :func:`fit_chunk` compiles the program at the guessed chunk and, when
XLA says it exceeds the budget, shrinks the chunk along the line through the measured
points (at most three compilations; the program that runs is one of them, so a call that
fits compiles once, as without a budget). ``README.md`` (memory guide) and
``benchmarks/bench_reach.py --budget-check`` compare both with measured peak memory.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from dicejax.pytrees import tree_bytes

PyTree = Any

#: Default budget: this fraction of the memory that is free when the call starts.
DEFAULT_FRACTION = 0.5


def available_memory(device: jax.Device | None = None) -> int:
    """Bytes free on ``device`` (default: the first device of the default backend)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_budget() -> int:
    """:data:`DEFAULT_FRACTION` of :func:`available_memory`."""
    return int(DEFAULT_FRACTION * available_memory())


def check_budget(memory_budget: Any) -> int:
    """Validates ``memory_budget`` (positive bytes, or None for :func:`default_budget`)."""
    if memory_budget is None:
        return default_budget()
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int | float | np.number) \
            or not np.isfinite(memory_budget) or memory_budget <= 0:
        raise ValueError(f"memory_budget: must be a positive number of bytes, got "
                         f"{memory_budget!r}")
    return int(memory_budget)


class NodeBytes(NamedTuple):
    """Bytes of one node's pieces.

    Attributes:
      params: ``θ``; opt_state: its optimizer state; model_state: its model state.
      activations: what one local update's backward pass keeps (residuals of the loss' vjp
        on one batch).
      probe: residuals of one probe-loss evaluation's vjp (an upper bound of its forward).
    """

    params: int
    opt_state: int
    model_state: int
    activations: int
    probe: int

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.model_state


def node_bytes(sim, one, batch: PyTree, probe: PyTree) -> NodeBytes:
    """:class:`NodeBytes` of one node (shapes only: nothing runs).

    Args:
      sim: the simulator (its loss form).
      one: one node's :class:`~dicejax.simulator.NodeState` (no node axis; arrays or shape
        structs), e.g. ``traj.node_state(0, 0)``.
      batch: one node's training batch ``[B, ...]``; probe: the probe batch.
    """

    def residuals(p, ms, b, k, z):
        train = jax.vjp(lambda q: sim.loss_parts(q, ms, b, k)[0], p)[1]
        probe_fn = jax.vjp(lambda q: sim.probe_loss(q, ms, z), p)[1]
        return train, probe_fn

    train_res, probe_res = jax.eval_shape(residuals, one.params, one.model_state, batch,
                                          one.key, probe)
    acts, probe_acts = tree_bytes(train_res), tree_bytes(probe_res)
    return NodeBytes(tree_bytes(one.params), tree_bytes(one.opt_state),
                     tree_bytes(one.model_state), acts, probe_acts)


def source_bytes(nb: NodeBytes, sizes: tuple[int, ...], *, kind: str, order: int = 1,
                 degree: int = 1) -> int:
    """Estimated peak bytes of one source's re-run (see the module docstring).

    Args:
      nb: one node's bytes.
      sizes: ``(M_0, .., M_r)``: nodes reached after each hop (all ``n`` for the dense
        cascade).
      kind: ``"gt"`` or ``"e"``.
      order: the DICE-E order (2 adds the forward-over-forward probe evaluations).
      degree: ``D``, the padded in-degree (the restricted gossip gathers ``D`` rows).
    """
    peak = 0
    for s in range(1, len(sizes)):
        local = sizes[s - 1] * (nb.activations + 3 * nb.params + 2 * nb.opt_state
                                + 2 * nb.model_state)
        gossip = sizes[s] * (nb.state + min(degree, 2) * nb.params)
        probe = sizes[s] * nb.probe * (3 if (kind == "e" and order == 2) else 1)
        peak = max(peak, local + gossip + probe)
    states = sum(sizes[1:]) * nb.state  # what later hops keep of the earlier ones
    # DICE-E carries a tangent beside every primal value; DICE-GT re-runs the counterfactual
    return int((2 if kind == "e" else 1) * (peak + states))


def human_bytes(value: float) -> str:
    """``123.4 MiB`` and the like."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def memory_stats(compiled: Any) -> Any:
    """``compiled.memory_analysis()``, or None where the backend does not report it."""
    try:
        return compiled.memory_analysis()
    except Exception:  # backends without the analysis
        return None


def compiled_bytes(compiled: Any) -> int | None:
    """Bytes a compiled program allocates beyond its arguments, from XLA's buffer assignment
    (temporaries plus outputs, less outputs aliased to inputs); None where the backend does
    not report it."""
    stats = memory_stats(compiled)
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes)


def balanced_chunk(num: int, largest: int) -> int:
    """The chunk size of ``ceil(num / largest)`` equal chunks: ``largest`` (what fits) may
    vary with the free memory, the chunk stays put (no recompilation)."""
    return -(-num // -(-num // max(1, largest)))


def fit_chunk(compile_at: Callable[[int], Any], first: int, num: int, budget: int, *,
              what: str, unit: str = "source",
              balance: Callable[[int, int], int] = balanced_chunk
              ) -> tuple[int, Any, int | None]:
    """The chunk of sources whose compiled program fits ``budget``, by XLA's count.

    Compiles at ``first`` sources per chunk (the estimate's choice). If XLA's buffer
    assignment (:func:`compiled_bytes`) exceeds the budget, compiles one source per chunk;
    the bytes of a chunk of ``k`` are then ``F + k S`` through the two points, and the
    largest ``k`` within the budget is compiled (if it still does not fit, one source per
    chunk runs). At most three compilations.

    Args:
      compile_at: ``k -> compiled program`` with ``k`` sources per chunk.
      first: the first chunk to try; num: the number of sources.
      budget: bytes.
      what: names the computation in the error; unit: what one item of a chunk is.
      balance: ``(num, largest) -> chunk`` (equal chunks of at most ``largest``).

    Returns:
      ``(chunk, compiled, bytes)`` (``bytes`` None where XLA does not report it).

    Raises:
      ValueError: when a chunk of one exceeds the budget; it says how much it needs.
    """
    compiled = compile_at(first)
    need = compiled_bytes(compiled)
    if need is None or need <= budget:
        return first, compiled, need
    if first > 1:
        one = compile_at(1)
        need_one = compiled_bytes(one)
    else:
        one, need_one = compiled, need
    if need_one is not None and need_one > budget:
        raise ValueError(
            f"memory_budget: a chunk of one {unit} needs {human_bytes(need_one)} (XLA's buffer "
            f"assignment of the compiled {what} program), more than the budget of "
            f"{human_bytes(budget)}; pass a larger memory_budget=, a smaller problem, or run on "
            "a device with more memory")
    if first == 1 or need_one is None:
        return 1, one, need_one
    per = max((need - need_one) / (first - 1), 1.0)
    k = balance(num, max(1, min(first - 1, int((budget - need_one) / per) + 1)))
    if k > 1:
        compiled = compile_at(k)
        got = compiled_bytes(compiled)
        if got is not None and got <= budget:
            return k, compiled, got
    return 1, one, need_one


#: Compiled chunk programs already checked against a budget, ``(signature, chunk) ->`` an
#: object with ``.compiled`` and ``memory_analysis()`` (least recently used first), so that
#: a repeated query compiles nothing; the last entry is the program the latest budgeted call
#: ran.
FITTED: collections.OrderedDict = collections.OrderedDict()

#: How many compiled chunk programs :func:`run_chunked` keeps.
FITTED_CACHE = 16


class _Fitted:
    """A compiled chunk program and its memory analysis, read once (reading it costs about
    as much as a small query)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.stats = memory_stats(compiled)

    def memory_analysis(self):
        return self.stats


def _signature(fn, args: tuple, static: dict) -> tuple:
    leaves, treedef = jax.tree.flatten(args[1:])
    return (fn, args[0], tuple(sorted(static.items())), treedef,
            tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves))


def run_chunked(fn: Callable, args: tuple, static: dict, *, chunk: int, num: int,
                budget: int | None, what: str, unit: str = "source") -> Any:
    """Runs a chunked program ``fn(*args, batch_size=k, **static)`` within a memory budget.

    Without a budget (the caller gave ``batch_size``), ``k = chunk``. Otherwise ``chunk`` is
    the first guess, checked by XLA's buffer assignment of the compiled program
    (:func:`fit_chunk`); the compiled program that fits runs, and is kept for repeated calls
    with the same shapes (:data:`FITTED`, at most :data:`FITTED_CACHE`).

    Args:
      fn: a jitted function with a static first argument (``loss_fn``) and a static
        ``batch_size`` keyword.
      args: its positional arguments, the static one first; static: its other static
        keywords.
      chunk: the chunk (or first guess); num: the number of items chunked.
      budget: bytes, or None.
      what, unit: name the program and its items in errors.
    """
    if budget is None:
        return fn(*args, batch_size=chunk, **static)
    key = _signature(fn, args, static)

    def compile_at(k: int):
        fitted = FITTED.get((key, k))
        if fitted is None:
            fitted = _Fitted(fn.lower(*args, batch_size=k, **static).compile())
            FITTED[key, k] = fitted
            while len(FITTED) > FITTED_CACHE:
                FITTED.popitem(last=False)
        FITTED.move_to_end((key, k))
        return fitted

    _, fitted, _ = fit_chunk(compile_at, chunk, num, budget, what=what, unit=unit)
    return fitted.compiled(*args[1:])


__all__ = [
    "DEFAULT_FRACTION",
    "FITTED",
    "FITTED_CACHE",
    "NodeBytes",
    "available_memory",
    "balanced_chunk",
    "check_budget",
    "compiled_bytes",
    "default_budget",
    "fit_chunk",
    "human_bytes",
    "memory_stats",
    "node_bytes",
    "run_chunked",
    "source_bytes",
]
