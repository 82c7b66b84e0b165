"""A plain-numpy FedBuff (Nguyen et al., AISTATS 2022, Algorithm 1) for the tests,
written from the paper: the server adds each arriving client update Δ_k, scaled by the
staleness function s(τ_k), to a buffer; after K of them it takes
x <- x - η_g (1/K) Σ_k s(τ_k) Δ_k and empties the buffer. τ_k counts the server
updates since the model the client trained on. Δ is y_0 - y_Q (original - trained), as
gridfl's diff."""

from __future__ import annotations

import numpy as np

from tests._strategy_reference import _cast_like, _flat

#: the flat float64 vector of a model's arrays, and back to their shapes and dtypes
flat, unflat = _flat, _cast_like


def polynomial(exponent: float = 0.5):
    return lambda tau: (1.0 + tau) ** -exponent


INVERSE_SQRT = polynomial(0.5)  # the paper's experiments: 1/sqrt(1 + tau)


def fedbuff(start, arrivals, *, buffer_size, server_lr=1.0, weight=INVERSE_SQRT):
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
