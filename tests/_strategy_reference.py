"""Plain-numpy references, written from the papers, for the live-node strategy tests.

Reddi et al.'s sign: Δ = mean(trained - original) = -mean(diff); x += η m / (√v + τ).
Each function takes the starting float32 params and, per cycle, the reports as
``(diff arrays, num_samples)``; it returns the float32 params after each cycle.
"""

from __future__ import annotations

import numpy as np


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _cast_like(flat: np.ndarray, like) -> list[np.ndarray]:
    out, i = [], 0
    for a in like:
        out.append(flat[i : i + a.size].reshape(a.shape).astype(a.dtype))
        i += a.size
    return out


def fedadam(start, cycles, *, eta, beta_1, beta_2, tau):
    """FedAdam, Algorithm 2 of Reddi et al. (ICLR 2021): v from τ², no bias correction,
    Δ weighted by num_samples."""
    x = _flat(start)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    history = []
    for reports in cycles:
        w = np.array([n for _, n in reports], dtype=np.float64)
        delta = sum(wi * -_flat(d) for wi, (d, _) in zip(w, reports, strict=True)) / w.sum()
        m = beta_1 * m + (1 - beta_1) * delta
        v = beta_2 * v + (1 - beta_2) * delta**2
        params = _cast_like(x + eta * m / (np.sqrt(v) + tau), start)
        x = _flat(params)
        history.append(params)
    return history


def median(start, cycles):
    """Coordinate-wise median of the diffs (Yin et al.), applied as new = x - median."""
    x, history = _flat(start), []
    for reports in cycles:
        rows = np.stack([_flat(d) for d, _ in reports])
        cols = np.sort(rows, axis=0)
        n = rows.shape[0]
        med = cols[n // 2] if n % 2 else (cols[n // 2 - 1] + cols[n // 2]) / 2
        params = _cast_like(x - med, start)
        x = _flat(params)
        history.append(params)
    return history


def krum(start, cycles, *, f):
    """Krum (Blanchard et al.): the diff with the least sum of squared distances to its
    n - f - 2 nearest others, applied as new = x - that diff."""
    x, history = _flat(start), []
    for reports in cycles:
        rows = [_flat(d) for d, _ in reports]
        n = len(rows)
        scores = []
        for i in range(n):
            dists = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(n) if j != i)
            scores.append(sum(dists[: n - f - 2]))
        params = _cast_like(x - rows[int(np.argmin(scores))], start)
        x = _flat(params)
        history.append(params)
    return history


def assert_params_close(got, want, rtol=1e-5, atol=1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
