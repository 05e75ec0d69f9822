"""dicejax: decentralized learning simulation and DICE data-influence cascades in JAX.

The curated public API::

    import dicejax as dj
    topo = dj.topology.exponential(16)
    traj = dj.simulate(loss_fn, dj.replicate(params, 16), batches, topo)      # one call

    sim = dj.atc(loss_fn, optax.sgd(0.1), dj.mixing.from_topology(topo))      # or your loop
    state = sim.init(dj.replicate(params, 16))
    state, out = sim.step(state, batch)                                       # one step
    state, outs = dj.run(sim, state, batches, record=True)                    # a lax.scan
    traj = dj.Trajectory.from_run(sim, state0, outs, batches)                 # for influence

    dj.influence.dice_e(loss_fn, traj, probe, step=3, hops=2)

``import dicejax`` loads the core (topology, mixing, robust, simulator, trajectory,
simulate, influence, parallel); ``apps``, ``attacks``, ``checkpoint`` (Orbax), ``data``
(scikit-learn), ``models`` (flax.linen), ``topology_opt`` and ``experiments`` load on first
use.
"""

import importlib
from typing import Any

from dicejax import influence, mixing, parallel, robust, topology
from dicejax.simulate import init, simulate
from dicejax.simulator import (
    Gate,
    NodeState,
    Simulator,
    StepOutput,
    atc,
    replicate,
    run,
)
from dicejax.topology import Topology
from dicejax.trajectory import Trajectory

__version__ = "0.2.0"

_LAZY = ("apps", "attacks", "checkpoint", "data", "experiments", "models", "topology_opt")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"dicejax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'dicejax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Gate",
    "NodeState",
    "Simulator",
    "StepOutput",
    "Topology",
    "Trajectory",
    "__version__",
    "apps",
    "atc",
    "attacks",
    "checkpoint",
    "data",
    "experiments",
    "influence",
    "init",
    "mixing",
    "models",
    "parallel",
    "replicate",
    "robust",
    "run",
    "simulate",
    "topology",
    "topology_opt",
]
