"""Server optimizers: the cycle's mean diff is a pseudo-gradient, and the node takes one
optimizer step with it per completed cycle.

* FedAvgM (Hsu, Qi & Brown 2019): server momentum, as PyTorch SGD (no dampening).
* FedAdagrad, FedAdam, FedYogi (Reddi et al., *Adaptive Federated Optimization*, ICLR
  2021, Algorithm 2), in gridfl's sign: our diff is original - trained, so the mean diff
  ``g`` is minus the paper's Δ, the first moment is minus the paper's, and the step is
  subtracted. As in the paper (not Flower): ``v`` starts at τ², and FedAdam has no bias
  correction.

They stay streaming: they fold reports exactly as FedAvg (O(model) memory, however many
report), and their state is two float64 vectors of the model's size plus a step count.

>>> import numpy as np
>>> from gridfl.server import aggregate as agg
>>> spec = agg.ModelSpec.of([np.zeros(2, np.float32)])
>>> sums = agg.RunningSums(spec)
>>> adam = FedOpt("fedadam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
>>> adam.fold(sums, [np.array([1.0, -1.0], np.float32)], None)
>>> new, state = adam.aggregate(sums, [np.zeros(2, np.float32)])
>>> state.step, bool(new[0][0] < 0 < new[0][1])
(1, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gridfl.server import aggregate as agg


class FedAvgM(agg.Strategy):
    """``v = momentum * v + g`` (``v = g`` at first); ``new = current - lr * v``."""

    def __init__(
        self, *, server_learning_rate: float, server_momentum: float, clip_norm=None
    ) -> None:
        super().__init__(clip_norm=clip_norm)
        self.lr = server_learning_rate
        self.momentum = server_momentum

    def step(self, update, params, spec, state):
        v = update if state is None else self.momentum * state.tensors["v"] + update
        steps = 1 if state is None else state.step + 1
        return agg.apply_diff(params, self.lr * v, spec), agg.StrategyState(steps, {"v": v})

    def describe(self, state):
        return _describe(state)


class FedOpt(agg.Strategy):
    """FedAdagrad, FedAdam or FedYogi (``rule``), Reddi et al. Algorithm 2:

    ``m = beta_1 m + (1 - beta_1) g``;
    ``v = v + g²`` (adagrad), ``beta_2 v + (1 - beta_2) g²`` (adam),
    ``v - (1 - beta_2) g² sign(v - g²)`` (yogi), from ``v = tau²``;
    ``new = current - eta m / (sqrt(v) + tau)``.
    """

    def __init__(
        self,
        rule: str,
        *,
        eta: float,
        beta_1: float,
        tau: float,
        beta_2: float = 0.0,
        clip_norm=None,
    ) -> None:
        super().__init__(clip_norm=clip_norm)
        self.rule, self.eta, self.beta_1, self.beta_2, self.tau = rule, eta, beta_1, beta_2, tau

    def step(self, update, params, spec, state):
        g = update
        if state is None:
            state = agg.StrategyState(
                0, {"m": np.zeros_like(g), "v": np.full_like(g, self.tau * self.tau)}
            )
        m = self.beta_1 * state.tensors["m"] + (1.0 - self.beta_1) * g
        v, g2 = state.tensors["v"], g * g
        if self.rule == "fedadagrad":
            v = v + g2
        elif self.rule == "fedadam":
            v = self.beta_2 * v + (1.0 - self.beta_2) * g2
        else:  # fedyogi: v moves additively toward g²
            v = v - (1.0 - self.beta_2) * g2 * np.sign(v - g2)
        new = agg.apply_diff(params, self.eta * m / (np.sqrt(v) + self.tau), spec)
        return new, agg.StrategyState(state.step + 1, {"m": m, "v": v})

    def describe(self, state):
        return _describe(state)


def _describe(state: agg.StrategyState | None) -> dict[str, Any]:
    """The step count and each moment's L2 norm (the state's size is the model's)."""
    if state is None:
        return {"step": 0}
    norms = {f"{k}_norm": float(np.linalg.norm(v)) for k, v in state.tensors.items()}
    return {"step": state.step, **norms}


def build(name: str, params: dict[str, Any], *, clip_norm: float | None) -> agg.Strategy:
    if name == "fedavgm":
        return FedAvgM(clip_norm=clip_norm, **params)
    return FedOpt(name, clip_norm=clip_norm, **params)
