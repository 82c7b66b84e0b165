"""Simulation: a hosted process definition over thousands of virtual clients on one
machine (a pool of worker processes) or a Ray cluster, aggregated by the node's own code.

>>> from gridfl.simulation import partition
>>> import numpy as np
>>> [len(p) for p in partition(np.arange(12) % 3, 4, "iid")]
[3, 3, 3, 3]

See :func:`simulate` and docs/simulation.md.
"""

from gridfl.simulation.partition import PARTITIONERS, dirichlet, iid, partition, shards
from gridfl.simulation.results import RoundResult, SimulationResult
from gridfl.simulation.run import SimulationOptions, simulate

__all__ = [
    "PARTITIONERS",
    "RoundResult",
    "SimulationOptions",
    "SimulationResult",
    "dirichlet",
    "iid",
    "partition",
    "shards",
    "simulate",
]
