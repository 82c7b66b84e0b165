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


#: columns per block of the coordinate-wise rules: sorting a (n, block) slice keeps each
#: coordinate's n values in cache (10x faster than np.median over the whole axis 0 on the
#: CNN) and bounds the extra memory to one block
_BLOCK = 1 << 16


def _by_block(x: np.ndarray, rule) -> np.ndarray:
    """``rule(sorted (n, block) slice) -> (block,)`` over every block of columns."""
    out = np.empty(x.shape[1])
    for start in range(0, x.shape[1], _BLOCK):
        out[start : start + _BLOCK] = rule(np.sort(x[:, start : start + _BLOCK], axis=0))
    return out


def median(x: np.ndarray) -> np.ndarray:
    """Per coordinate, the median of the reports (the mean of the middle two for even n)."""
    n = x.shape[0]
    return _by_block(x, lambda s: (s[(n - 1) // 2] + s[n // 2]) / 2)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate, drop the ``floor(beta n)`` lowest and highest values; mean the rest."""
    n = x.shape[0]
    k = math.floor(beta * n)
    return _by_block(x, lambda s: s[k : n - k].mean(axis=0))


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Each report's sum of squared L2 distances to its ``n - f - 2`` nearest others."""
    n = x.shape[0]
    gram = x @ x.T  # float64: |a - b|² = |a|² + |b|² - 2 a.b, n x n, no n x model copy
    sq = np.diag(gram)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(d, 0.0)
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

    def closest_to_median(s: np.ndarray) -> np.ndarray:
        med = (s[(theta - 1) // 2] + s[theta // 2]) / 2
        nearest = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
        return np.take_along_axis(s, nearest, axis=0).mean(axis=0)

    return _by_block(sel, closest_to_median)


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

    def combine(self, sums):
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
            return median(x)
        if self.name == "fedtrimmedavg":
            return trimmed_mean(x, self.beta)
        if self.name == "krum":
            return krum(x, self.f)
        if self.name == "multikrum":
            return multi_krum(x, self.f, self.m)
        return bulyan(x, self.f)


def build(name: str, params: dict[str, Any], *, clip_norm: float | None) -> agg.Strategy:
    return Robust(name, params, clip_norm=clip_norm)
