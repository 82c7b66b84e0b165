"""Simulation: a hosted process definition over thousands of virtual clients on one
machine (a pool of worker processes) or a Ray cluster, aggregated by the node's own code.

>>> from gridfl.simulation import partition
>>> import numpy as np
>>> print(*[len(p) for p in partition(np.arange(12) % 3, 4, "iid")])
3 3 3 3

See :func:`simulate` and docs/simulation.md. :func:`simulate` is imported on first use
(PEP 562): a pool worker, which imports only the client side
(``gridfl.simulation.clients``), starts without the node's hosting code and its database
layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gridfl._lazy import lazy_attributes as _lazy_attributes

# eager: the function ``partition`` must shadow the module of the same name
from gridfl.simulation.partition import PARTITIONERS, dirichlet, iid, partition, shards
from gridfl.simulation.results import RoundResult, SimulationResult

if TYPE_CHECKING:
    from gridfl.simulation.run import SimulationOptions, simulate

_LAZY = dict.fromkeys(("SimulationOptions", "simulate"), "gridfl.simulation.run")

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


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
