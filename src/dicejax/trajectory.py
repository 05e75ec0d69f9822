"""A recorded run: what the influence functions re-run and differentiate.

A :class:`Trajectory` holds the :class:`~dicejax.simulator.Simulator` that ran (its gossip
operator, optimizer and loss form), the state after the last step, the per-step metrics and,
when recorded, every state ``θ^0 .. θ^T`` (with optimizer and model states), the half steps
``θ^{½} .. θ^{T−½}``, the batches and the update gates. :func:`dicejax.simulate` returns
one; :meth:`Trajectory.from_run` builds one from what *any* loop recorded — :func:`~dicejax.
simulator.run`'s outputs, or a user's own loop over :meth:`~dicejax.simulator.Simulator.step`::

    state0 = state = sim.init(params)
    outs = []
    for batch in batches_list:
        state, out = sim.step(state, batch, record=True)
        outs.append(out)                                   # your own logic in between
    traj = dj.Trajectory.from_run(sim, state0, outs, batches_list)

**Step indices.** Every public function that takes a trajectory takes *local* step indices
``0 <= t < T`` (the position in the trajectory: ``traj.params`` has ``θ^t`` at index ``t``),
also for a resumed run whose first step is the global step ``start_step``;
:meth:`Trajectory.global_step` converts. Influence re-runs replay ``Simulator.step`` with the
recorded batches and gates from the recorded state at ``t``; what a custom loop did *between*
steps (editing states) is part of the recorded states, but it is not replayed in re-runs of
later steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dicejax import pytrees
from dicejax.pytrees import stack
from dicejax.simulator import Gate, NodeState, Simulator, StepOutput, as_gate

PyTree = Any


def _prepend(first: PyTree, rest: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _leading(tree: PyTree) -> set[tuple[int, ...]]:
    return {tuple(jnp.shape(x)[:2]) for x in jax.tree.leaves(tree)}


@pytrees.dataclass
class Trajectory:
    """A run of ``T`` steps (from :func:`dicejax.simulate` or :meth:`from_run`).

    Attributes:
      simulator: the :class:`~dicejax.simulator.Simulator` that ran (mixer, optimizer,
        loss form).
      final_state: the :class:`~dicejax.simulator.NodeState` after the last step.
      metrics: ``{"loss": [T, n]`` train loss ``L(θ_k^t; z_k^t)`` before each step,
        ``"consensus": [T]`` consensus distance after each gossip (when computed), with
        periodic evaluation ``"eval": {"step": [E], name: [E, n]}``, with ``has_aux``
        ``"aux"``: the loss' auxiliary outputs, leaves ``[T, n, ...]``, in isolating runs
        ``"finite": [T, n]`` whether each local update was finite (see :attr:`diverged`).
      states: every state ``θ^0 .. θ^T`` (a NodeState with leaves ``[T+1, n, ...]``;
        recorded runs, else None).
      half_params: ``θ^{½} .. θ^{T-½}``, leaves ``[T, n, ...]`` (or None).
      half_model_states: model states after each local update, before gossip, leaves
        ``[T, n, ...]`` (stateful simulators; else None).
      batches: the training batches, leaves ``[T, n, B, ...]`` (or None).
      gates: a :class:`~dicejax.simulator.Gate` of ``[T, n]`` update gates, or None (all 1).
      start_step: global index of the first step (non-zero for resumed runs).
    """

    simulator: Simulator
    final_state: NodeState
    metrics: dict
    states: NodeState | None = None
    half_params: PyTree | None = None
    half_model_states: PyTree | None = None
    batches: PyTree | None = None
    gates: Gate | None = None
    start_step: int = pytrees.static_field(default=0)

    # ----------------------------------------------------------------------------------------
    # building
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        sim: Simulator,
        initial_state: NodeState,
        outputs: StepOutput | Sequence[StepOutput],
        batches: PyTree | Sequence[PyTree] | None = None,
        gates: Gate | jax.Array | Sequence[Any] | None = None,
        *,
        final_state: NodeState | None = None,
        eval_metrics: dict | None = None,
    ) -> Trajectory:
        """A trajectory from the outputs of any loop over ``sim.step``.

        Args:
          sim: the simulator that ran.
          initial_state: the state before the first step (``θ^0``).
          outputs: :func:`~dicejax.simulator.run`'s outputs (leaves ``[T, ...]``) or a list
            (a Python ``list``) of ``T`` :class:`~dicejax.simulator.StepOutput` from
            ``sim.step``. Recorded
            outputs (``record=True``) make a recorded trajectory, which the influence
            functions need; unrecorded ones need ``final_state``.
          batches: the batches of the ``T`` steps, leaves ``[T, n, B, ...]`` or a ``list`` of
            ``T`` batches (required with recorded outputs).
          gates: the gates the steps used: ``[T, n]``, a :class:`Gate` of ``[T, n]``, a
            ``list`` of ``T`` per-step gates, or None.
          final_state: the state after the last step (default: the last recorded state).
          eval_metrics: optional ``{"step": [E], name: [E, n]}`` stored as
            ``metrics["eval"]``.

        Returns:
          A :class:`Trajectory` (``start_step`` = ``initial_state.step``).

        Raises:
          ValueError: for outputs, batches or gates whose leading axes disagree, recorded
            outputs without batches, or unrecorded outputs without ``final_state``.
        """
        if not isinstance(sim, Simulator):
            raise ValueError(f"sim: must be a dicejax Simulator (dj.atc), got {type(sim)}")
        if not isinstance(initial_state, NodeState):
            raise ValueError(f"initial_state: must be a NodeState, got {type(initial_state)}")
        if isinstance(outputs, list):
            if not outputs:
                raise ValueError("outputs: empty; give at least one step")
            outputs = stack(outputs)
        if not isinstance(outputs, StepOutput):
            raise ValueError(f"outputs: must be StepOutputs, got {type(outputs)}")
        T, n = jnp.shape(outputs.loss)
        if isinstance(batches, list):
            batches = stack(batches)
        if isinstance(gates, list):
            gates = stack([as_gate(jnp.asarray(g) if not isinstance(g, Gate) else g)
                           for g in gates])
        gates = None if gates is None else as_gate(gates)
        for name, tree in (("batches", batches), ("gates", gates)):
            if tree is not None and _leading(tree) != {(T, n)}:
                raise ValueError(f"{name}: leading axes {sorted(_leading(tree))} do not match "
                                 f"the outputs' [T={T}, n={n}]")
        metrics = {"loss": outputs.loss}
        if outputs.consensus is not None:
            metrics["consensus"] = outputs.consensus
        if outputs.aux is not None:
            metrics["aux"] = outputs.aux
        if sim.isolate and outputs.finite is not None:
            metrics["finite"] = outputs.finite
        if eval_metrics is not None:
            metrics["eval"] = eval_metrics
        start = int(initial_state.step)
        if outputs.state is None:
            if final_state is None:
                raise ValueError("final_state: required when the outputs were not recorded "
                                 "(record=False)")
            return cls(sim, final_state, metrics, start_step=start)
        if batches is None:
            raise ValueError("batches: required to build a recorded trajectory (influence "
                             "re-runs replay them)")
        if final_state is None:
            final_state = jax.tree.map(lambda x: x[-1], outputs.state)
        return cls(sim, final_state, metrics, _prepend(initial_state, outputs.state),
                   outputs.half_params, outputs.half_model_state, batches, gates, start)

    # ----------------------------------------------------------------------------------------
    # readings
    # ----------------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """``T``, the number of steps run."""
        return int(self.metrics["loss"].shape[0])

    @property
    def num_nodes(self) -> int:
        """``n``."""
        return int(self.metrics["loss"].shape[1])

    @property
    def diverged(self) -> np.ndarray:
        """``[n]`` int: the global step at which each node's local update ``θ_k^{t+½}``
        first became non-finite, −1 for nodes that never diverged (runs with
        ``on_divergence="isolate"``; other runs stop at a divergence, so all −1)."""
        n = self.num_nodes
        if "finite" not in self.metrics:
            return np.full(n, -1)
        bad = ~np.asarray(self.metrics["finite"])
        first = np.where(bad.any(axis=0), np.argmax(bad, axis=0) + self.start_step, -1)
        return first.astype(np.int64)

    @property
    def recorded(self) -> bool:
        """Whether the states were recorded (what influence needs)."""
        return self.states is not None

    @property
    def mixer(self):
        """The gossip operator (``mixer.matrices`` ``[P, n, n]``; global step ``t`` uses
        ``matrices[t % P]``)."""
        return self.simulator.mixer

    @property
    def optimizer(self):
        """The nodes' optax transformation."""
        return self.simulator.optimizer

    @property
    def final_params(self) -> PyTree:
        """``θ^T``, leaves ``[n, ...]``."""
        return self.final_state.params

    @property
    def final_opt_state(self) -> PyTree:
        """The optimizer states after the last step, leaves ``[n, ...]``."""
        return self.final_state.opt_state

    @property
    def params(self) -> PyTree | None:
        """``θ^0 .. θ^T``, leaves ``[T+1, n, ...]`` (recorded runs)."""
        return None if self.states is None else self.states.params

    @property
    def opt_states(self) -> PyTree | None:
        """Optimizer states at the start of each step and after the last, ``[T+1, n, ...]``."""
        return None if self.states is None else self.states.opt_state

    @property
    def model_states(self) -> PyTree | None:
        """Model states ``[T+1, n, ...]`` (stateful simulators, recorded runs)."""
        return None if self.states is None else self.states.model_state

    @property
    def update_scale(self) -> jax.Array | None:
        """``[T, n]`` gates of the local parameter updates, or None (all ones)."""
        return None if self.gates is None else self.gates.update

    def global_step(self, t: int) -> int:
        """The global step index of local index ``t``."""
        return self.start_step + t

    def state_at(self, t) -> NodeState:
        """The recorded :class:`NodeState` at local index ``t`` (``0 <= t <= T``)."""
        return jax.tree.map(lambda x: x[t], self.states)

    def node_state(self, t, k) -> NodeState:
        """Node ``k``'s recorded :class:`NodeState` at local step ``t`` (no node axis)."""
        st = self.state_at(t)
        params, opt, ms = jax.tree.map(lambda x: x[k], (st.params, st.opt_state,
                                                        st.model_state))
        return st._replace(params=params, opt_state=opt, model_state=ms)

    def node_struct(self) -> NodeState:
        """One node's recorded :class:`NodeState` as ``jax.ShapeDtypeStruct`` leaves (the
        shapes of :meth:`node_state`; nothing is sliced or run, so validation and planning
        cost no device work)."""
        st = self.states

        def strip(lead):
            return lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype)

        params, opt, ms = jax.tree.map(strip(2), (st.params, st.opt_state, st.model_state))
        step, key = jax.tree.map(strip(1), (st.step, st.key))
        return NodeState(params, opt, step, ms, key)

    def batch_struct(self) -> PyTree:
        """One node's training batch of one step, ``[B, ...]``, as shape structs."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), self.batches)

    def matrix_at(self, t) -> jax.Array:
        """``W`` ``[n, n]`` of the local step ``t`` (may be traced)."""
        return self.mixer.matrix_at(self.start_step + t)

    def matrices(self, start: int = 0, stop: int | None = None) -> jax.Array:
        """Per-step matrices ``[stop - start, n, n]`` of the local steps ``start..stop-1``."""
        stop = self.num_steps if stop is None else stop
        return self.matrices_from(start, stop - start)

    def matrices_from(self, t, length: int) -> jax.Array:
        """``[length, n, n]``: the matrices of local steps ``t .. t+length-1`` (``t`` may be
        traced, ``length`` is static)."""
        idx = (self.start_step + t + jnp.arange(length)) % self.mixer.period
        return self.mixer.matrices[idx]


def final_state(traj: Trajectory) -> NodeState:
    """The :class:`NodeState` after the last step of a trajectory (to resume a run)."""
    return traj.final_state


__all__ = ["Trajectory", "final_state"]
