"""Secure aggregation in a simulation (``server_config.secure_aggregation``).

Each round's reports go through the four stages of :mod:`gridfl.secagg` in this process:
the worker's own code for every client (keys, Shamir shares, clipping, quantization,
masks) and the node's own :class:`~gridfl.secagg.NodeSession`, whose unmasked sum becomes
the round's running sums as on the node (:func:`gridfl.server.aggregate.unmasked_sums`).
No client drops out. Quantization's stochastic rounding is drawn from the run's seed, so
a run is deterministic for its seed; the keys, and so the masks, are fresh random ones
each round, and cancel exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError

__all__ = ["SimulatedSecureAggregation"]


class SimulatedSecureAggregation:
    """The protocol for one process: :meth:`sums` runs one round of it."""

    def __init__(self, server_config: Mapping[str, Any], clients_per_round: int,
                 seed: int) -> None:
        from gridfl.secagg import SecAggParams
        from gridfl.server.config import worker_capacity

        capacity = worker_capacity(dict(server_config))
        if capacity is not None and clients_per_round > capacity:
            raise ConfigError(
                f"clients_per_round ({clients_per_round}) is more than the {capacity} "
                "workers a cycle takes (max_workers), which secure aggregation's field is "
                "sized for: raise max_workers, or simulate fewer clients per round"
            )
        if server_config.get("differential_privacy") is not None:
            raise ConfigError(
                "server_config secure_aggregation with differential_privacy: not simulated "
                "yet; remove one of them to simulate"
            )
        self.params = SecAggParams(**server_config["secure_aggregation"])
        self.seed = seed

    def sums(self, spec: Any, r: int,
             inputs: Sequence[tuple[int, Sequence[np.ndarray], int | None]]) -> Any:
        """Round ``r``'s ``(client, diff, num_samples)`` inputs, masked and summed: the
        node's running sums. Too few clients for the threshold raises
        :class:`~gridfl._exceptions.AggregationAbortedError`, as the node expires the
        cycle."""
        from gridfl.secagg import NodeSession, WorkerSession
        from gridfl.server.aggregate import unmasked_sums

        session = f"gridfl simulation round {r}".encode()
        node = NodeSession(self.params, session, spec.total + 1)
        workers = {f"client-{c}": WorkerSession(self.params, f"client-{c}", session)
                   for c, _, _ in inputs}
        for u, worker in workers.items():
            node.add_keys(u, worker.advertise())
        rosters = node.close_stage()
        for u, worker in workers.items():
            node.add_shares(u, worker.share_keys(rosters[u]))
        forwarded = node.close_stage()
        for (c, diff, num_samples), (u, worker) in zip(inputs, workers.items(), strict=True):
            rounding = np.random.default_rng([self.seed, 2, r, c])
            node.add_masked(u, worker.masked_input(forwarded[u], diff, num_samples, rounding))
        requests = node.close_stage()
        for u, worker in workers.items():
            node.add_unmask(u, worker.unmask(requests[u]))
        node.close_stage()
        assert node.result is not None  # the last stage closed
        return unmasked_sums(node.result, len(inputs), self.params, spec)
