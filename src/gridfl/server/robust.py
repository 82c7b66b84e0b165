"""Robust aggregation: rules that look at every diff of a cycle, so that a few poisoned
reports cannot drag the model far. All of them are unweighted (a self-reported
``num_samples`` would let an attacker buy weight) and computed in float64.

* coordinate-wise median and trimmed mean (Yin et al., ICML 2018);
* Krum and Multi-Krum (Blanchard et al., NeurIPS 2017);
* Bulyan (El Mhamdi et al., ICML 2018).

Each row of ``x`` below is one report's flat diff (n reports, f assumed Byzantine).

>>> import numpy as np
>>> x = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [100.0, -50.0]])
>>> median(x).tolist()
[2.5, 0.5]
>>> krum(x, f=0).tolist()
[2.0, 1.0]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gridfl._exceptions import ModelError
from gridfl.server import aggregate as agg


def min_reports(name: str, f: int) -> int:
    """The fewest reports ``name`` works with when ``f`` of them may be Byzantine."""
    if name in ("krum", "multikrum"):
        return 2 * f + 3  # n > 2f + 2 (Blanchard et al.)
    if name == "bulyan":
        return 4 * f + 3  # n >= 4f + 3 (El Mhamdi et al.)
    return 1


def median(x: np.ndarray) -> np.ndarray:
    """Per coordinate, the median of the reports (the mean of the middle two for even n)."""
    return np.median(x, axis=0)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate, drop the ``floor(beta n)`` lowest and highest values; mean the rest."""
    k = math.floor(beta * x.shape[0])
    return np.sort(x, axis=0)[k : x.shape[0] - k].mean(axis=0)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Each report's sum of squared L2 distances to its ``n - f - 2`` nearest others."""
    n = x.shape[0]
    d = np.empty((n, n))
    for i in range(n):  # one row at a time: O(n x model) memory, not O(n² x model)
        diff = x - x[i]
        d[i] = np.einsum("ij,ij->i", diff, diff)
    closest = max(1, n - f - 2)
    # column 0 of each sorted row is the distance to itself (0)
    return np.sort(d, axis=1)[:, 1 : closest + 1].sum(axis=1)


def krum(x: np.ndarray, f: int) -> np.ndarray:
    """The one report with the lowest Krum score, as is."""
    return x[int(np.argmin(krum_scores(x, f)))]


def multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    """The plain mean of the ``m`` reports with the lowest Krum scores."""
    order = np.argsort(krum_scores(x, f), kind="stable")
    return x[order[:m]].mean(axis=0)


def bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """Select θ = n - 2f reports by Krum, one at a time on the shrinking set; then per
    coordinate, the mean of the β = θ - 2f selected values closest to their median."""
    n = x.shape[0]
    theta, rest = n - 2 * f, list(range(n))
    chosen = []
    for _ in range(theta):
        pick = rest[int(np.argmin(krum_scores(x[rest], f)))]
        chosen.append(pick)
        rest.remove(pick)
    sel = x[chosen]
    beta = theta - 2 * f
    med = np.median(sel, axis=0)
    nearest = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, nearest, axis=0).mean(axis=0)


class Robust(agg.Strategy):
    """A rule over every diff of the cycle: ``fold`` keeps each (clipped) diff,
    ``aggregate`` applies the rule to all of them."""

    needs_every_diff = True

    def __init__(self, name: str, params: dict[str, Any], *, clip_norm=None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.name = name
        self.f = params.get("num_malicious_nodes", 0)
        self.beta = params.get("beta", 0.0)
        self.m = params.get("num_nodes_to_select", 1)

    def fold(self, sums, diff, num_samples):
        sums.keep(agg.clip_l2(diff, self.clip_norm))

    def aggregate(self, sums, params, state=None):
        x = sums.diffs
        assert x is not None  # the node reads them back before completing
        n = x.shape[0]
        need = min_reports(self.name, self.f)
        if self.name == "multikrum":
            need = max(need, self.m + self.f)
        if n < need:
            raise ModelError(
                f"{self.name} with num_malicious_nodes = {self.f} needs at least {need} "
                f"reports; the cycle has {n} (raise min_diffs to {need})"
            )
        if self.name == "fedmedian":
            result = median(x)
        elif self.name == "fedtrimmedavg":
            result = trimmed_mean(x, self.beta)
        elif self.name == "krum":
            result = krum(x, self.f)
        elif self.name == "multikrum":
            result = multi_krum(x, self.f, self.m)
        else:
            result = bulyan(x, self.f)
        return agg.apply_diff(params, result, sums.spec), None


def build(name: str, params: dict[str, Any], *, clip_norm: float | None) -> agg.Strategy:
    return Robust(name, params, clip_norm=clip_norm)
