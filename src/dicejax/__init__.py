"""dicejax: decentralized learning simulation and DICE data-influence cascades in JAX.

The curated public API::

    import dicejax as dj
    topo = dj.topology.exponential(16)
    traj = dj.simulate(loss_fn, dj.replicate(params, 16), batches, topo)
"""

from dicejax import (
    apps,
    attacks,
    checkpoint,
    data,
    influence,
    mixing,
    models,
    parallel,
    topology,
    topology_opt,
)
from dicejax.simulate import (
    NodeState,
    Trajectory,
    init,
    replicate,
    simulate,
)
from dicejax.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "NodeState",
    "Topology",
    "Trajectory",
    "__version__",
    "apps",
    "attacks",
    "checkpoint",
    "data",
    "influence",
    "init",
    "mixing",
    "models",
    "parallel",
    "replicate",
    "simulate",
    "topology",
    "topology_opt",
]
