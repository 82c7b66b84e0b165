"""Differential privacy in a simulation: the node's own DP-FedAvg
(:class:`gridfl.server.privacy.PrivateAggregation`: clipping, noise once per round on the
sum, the fixed denominator, adaptive clipping, the accountant, the ``max_epsilon`` stop)
with its ledger kept in memory instead of ``privacy_cycles`` rows.

One choice is the simulation's alone: the noise comes from generators seeded by the run's
seed (``(seed, 4)`` for the node's noise, ``(seed, 5)`` for the workers' shares in
distributed mode), so that a run stays a function of its seed. A node never does this: its
noise comes from a :mod:`secrets`-seeded generator (:func:`gridfl.privacy.secure_rng`), as
noise anyone can replay from a known seed protects nothing. A simulation's model is no
private release.

    >>> from gridfl.server import aggregate as agg
    >>> from gridfl.server.dp_config import DPConfig
    >>> cfg = {"max_workers": 2, "max_diffs": None, "over_selection": 1.0,
    ...        "differential_privacy": {"mode": "central", "noise_multiplier": 0.0,
    ...        "clip_norm": 1.0, "delta": 1e-5, "population_size": 10,
    ...        "max_epsilon": None, "accountant": "rdp"}}
    >>> dp = SimulatedPrivacy(agg.FED_AVG, DPConfig.of(cfg), seed=0)
    >>> sums = agg.RunningSums(agg.ModelSpec.of([np.zeros(2)]))
    >>> dp.fold(sums, [np.array([30.0, 40.0])], 1)
    >>> new, _ = dp.aggregate(sums, [np.zeros(2)])
    >>> new[0].tolist(), dp.last["clip_norm"], dp.last["unclipped"]  # 0 - [0.6, 0.8] / 2
    ([-0.3, -0.4], 1.0, 0)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gridfl import privacy
from gridfl._exceptions import ConfigError
from gridfl.server import aggregate as agg
from gridfl.server.dp_config import DPConfig
from gridfl.server.privacy import PrivateAggregation

__all__ = ["SimulatedPrivacy", "check_population"]


class SimulatedPrivacy(PrivateAggregation):
    """:class:`~gridfl.server.privacy.PrivateAggregation` whose ledger is this object:
    ``last`` holds the last completed round's figures (``epsilon``, ``epsilon_next``,
    ``clip_norm``, ``next_clip_norm``, ``unclipped``)."""

    def __init__(self, inner: agg.Strategy, dp: DPConfig, seed: int) -> None:
        super().__init__(inner, dp, conn=None, process_id=0,  # type: ignore[arg-type]
                         rng=np.random.default_rng([seed, 4]))
        self.worker_rng = np.random.default_rng([seed, 5])
        self.steps, self.eps_next = 0, math.nan
        self.current_clip, self.bits = dp.initial_clip_norm, 0
        self.last: dict[str, Any] = {}

    def new_round(self) -> None:
        """Forget the counts of a round that did not complete (the node expires it)."""
        self.bits = 0

    def report(self, diff: list[np.ndarray]) -> list[np.ndarray]:
        """The diff as the worker SDK reports it: clipped and noised in distributed mode
        (:func:`gridfl.privacy.privatize`, the SDK's own function), else as is."""
        if self.dp.mode != "distributed":
            return diff
        c = self.current_clip
        return privacy.privatize(diff, c, self.worker_noise_std(c), self.worker_rng)

    def round_clip_norm(self) -> float:
        return self.current_clip

    def previous(self) -> tuple[int, float]:
        return self.steps, self.eps_next

    def count(self, clip_norm: float, bit: int) -> None:
        self.bits += bit

    def unclipped(self) -> int:
        return self.bits

    def record(self, clip_norm: float, values: dict[str, Any]) -> None:
        self.steps = int(values["steps"])
        nxt = values["epsilon_next"]
        self.eps_next = math.inf if nxt is None else float(nxt)
        self.last = {
            "epsilon": values["epsilon"], "epsilon_next": nxt, "clip_norm": clip_norm,
            "next_clip_norm": float(values["next_clip_norm"]), "unclipped": self.bits,
        }
        self.current_clip = float(values["next_clip_norm"])
        self.bits = 0


def check_population(dp: DPConfig, num_clients: int, clients_per_round: int) -> None:
    """Refuse a simulation whose population is not the one the accountant is told of: the
    sampling rate ``q`` must be ``clients_per_round / num_clients`` and the denominator
    ``m`` the clients per round."""
    if dp.population_size != num_clients or dp.expected_reports != clients_per_round or (
            not math.isclose(dp.sampling_rate, clients_per_round / num_clients)):
        raise ConfigError(
            f"differential_privacy accounts for {dp.expected_reports} reports per round "
            f"(sampling rate {dp.sampling_rate:g}) of population_size {dp.population_size}, "
            f"but the simulation draws {clients_per_round} of {num_clients} clients: set "
            "population_size to num_clients, and max_workers (or max_diffs) to "
            "clients_per_round with over_selection 1"
        )
