"""Secure aggregation in a simulation (``server_config.secure_aggregation``).

Each round runs the four stages of :mod:`gridfl.secagg` in the driving process: the
worker's own code for every client (keys, Shamir shares, clipping, quantization, masks)
and the node's own :class:`~gridfl.secagg.NodeSession`, whose unmasked sum becomes the
round's running sums as on the node (:func:`gridfl.server.aggregate.unmasked_sums`). The
round's clients exchange keys as soon as they are drawn, while they train, and each
masks its report as it arrives, so most of the protocol's CPU runs beside the training
(Bonawitz et al.'s order; a gridfl worker starts the key stages with its report). A
client whose report is refused drops out after sharing its keys, as on the node.
Quantization's stochastic rounding is drawn from the run's seed, so a run is
deterministic for its seed; the keys, and so the masks, are fresh random ones each
round, and cancel exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError

__all__ = ["SecureRound", "SimulatedSecureAggregation"]


class SimulatedSecureAggregation:
    """The protocol for one process: :meth:`start` opens a round of it."""

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
        if clients_per_round < self.params.min_survivors:
            raise ConfigError(
                f"clients_per_round ({clients_per_round}) is below secure aggregation's "
                f"min_survivors ({self.params.min_survivors}): every round would expire"
            )
        self.seed = seed

    def start(self, spec: Any, r: int, clients: Sequence[int]) -> SecureRound:
        """Round ``r``: its clients advertise their keys and share them."""
        return SecureRound(self, spec, r, clients)


class SecureRound:
    """One round's protocol, the stages taken as the simulation gets there."""

    def __init__(self, protocol: SimulatedSecureAggregation, spec: Any, r: int,
                 clients: Sequence[int]) -> None:
        from gridfl.secagg import NodeSession, WorkerSession

        self.protocol, self.spec, self.r = protocol, spec, r
        session = f"gridfl simulation round {r}".encode()
        params = protocol.params
        self.node = NodeSession(params, session, spec.total + 1)
        self.workers = {c: WorkerSession(params, f"client-{c}", session) for c in clients}
        for worker in self.workers.values():
            self.node.add_keys(worker.me, worker.advertise())
        rosters = self.node.close_stage()
        for worker in self.workers.values():
            self.node.add_shares(worker.me, worker.share_keys(rosters[worker.me]))
        self.forwarded = self.node.close_stage()

    def add(self, client: int, diff: Sequence[np.ndarray], num_samples: int | None) -> None:
        """Client ``client`` masks its report and the node folds it into the sum."""
        worker = self.workers[client]
        rounding = np.random.default_rng([self.protocol.seed, 2, self.r, client])
        masked = worker.masked_input(self.forwarded[worker.me], diff, num_samples, rounding)
        self.node.add_masked(worker.me, masked)

    def finish(self) -> Any:
        """Unmask: the node's running sums of the masked reports. Too few of them for the
        threshold raises :class:`~gridfl._exceptions.AggregationAbortedError`, as the
        node expires the cycle."""
        from gridfl.server.aggregate import unmasked_sums

        requests = self.node.close_stage()
        for worker in self.workers.values():
            if worker.me in requests:
                self.node.add_unmask(worker.me, worker.unmask(requests[worker.me]))
        self.node.close_stage()
        assert self.node.result is not None  # the last stage closed
        return unmasked_sums(self.node.result, len(self.node.masked), self.protocol.params,
                             self.spec)
