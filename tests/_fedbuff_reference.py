"""A plain-numpy FedBuff (Nguyen et al., AISTATS 2022, Algorithm 1) for the tests,
written from the paper: the server adds each arriving client update Δ_k, scaled by the
staleness function s(τ_k), to a buffer; after K of them it takes
x <- x - η_g (1/K) Σ_k s(τ_k) Δ_k and empties the buffer. τ_k counts the server
updates since the model the client trained on. Δ is y_0 - y_Q (original - trained), as
gridfl's diff."""

from __future__ import annotations

import numpy as np


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def unflat(vector: np.ndarray, like) -> list[np.ndarray]:
    out, i = [], 0
    for a in like:
        out.append(vector[i : i + a.size].reshape(a.shape).astype(a.dtype))
        i += a.size
    return out


def polynomial(exponent: float = 0.5):
    return lambda tau: (1.0 + tau) ** -exponent


def fedbuff(start, arrivals, *, buffer_size, server_lr=1.0, weight=polynomial()):
    """``arrivals``: ``(diff arrays, t_k)`` in arrival order, ``t_k`` the number of server
    updates the model the client trained on had seen (0 for the hosted model). Returns
    the params after each server update (cast to the start's dtypes each time, as a
    published checkpoint is)."""
    x = flat(start)
    t, buffer, k, history = 0, np.zeros_like(x), 0, []
    for diff, trained_at in arrivals:
        tau = t - trained_at
        buffer += weight(tau) * flat(diff)
        k += 1
        if k == buffer_size:
            params = unflat(x - server_lr * buffer / buffer_size, start)
            x = flat(params)
            history.append(params)
            t, buffer, k = t + 1, np.zeros_like(x), 0
    return history
