"""Buffered asynchronous aggregation (FedBuff: Nguyen et al., *Federated Learning with
Buffered Asynchronous Aggregation*, AISTATS 2022, Algorithm 1), as pure functions: the
validation of ``server_config.mode: "async"`` and its keys, the staleness weight, and the
fold of one report into the open buffer.

Algorithm 1's server, in gridfl's sign (a diff is original - trained, the paper's
``Δ = y_0 - y_Q``): each report ``Δ_k``, trained on a checkpoint ``τ_k`` checkpoints older
than the current one, is added to the buffer as ``s(τ_k) Δ_k``; after ``K`` reports
(``buffer_size``) the node publishes ``x <- x - η_g (1/K) Σ_k s(τ_k) Δ_k`` and empties the
buffer. The paper's experiments weigh by ``s(τ) = 1/sqrt(1 + τ)`` (the default here); the
mean is over ``K``, not over the weights, and ``num_samples`` plays no part (FedBuff's
mean is unweighted). With a server optimizer (``server_config.strategy``) the buffered
mean is the optimizer's pseudo-gradient, and its own rate replaces ``η_g``.

>>> cfg = normalize({"mode": "async", "buffer_size": 3, "max_staleness": 4})
>>> cfg["staleness_weight"], round(staleness_weight(cfg, 3), 3)
({'name': 'polynomial', 'exponent': 0.5}, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError
from gridfl.server import aggregate as agg
from gridfl.server import strategies

#: the keys of ``server_config`` that only ``mode: "async"`` takes, and their defaults
ASYNC_DEFAULTS: dict[str, Any] = {
    "buffer_size": 10,  # FedBuff's K (the paper's experiments use 10)
    "max_staleness": 20,
    "staleness_weight": {"name": "polynomial", "exponent": 0.5},
    "server_lr": 1.0,  # η_g
}

#: staleness weight name -> its parameters and their defaults
WEIGHTS: dict[str, dict[str, float]] = {
    "polynomial": {"exponent": 0.5},  # s(τ) = (1 + τ)^-exponent
    "constant": {},  # s(τ) = 1
}

#: keys of a synchronous process that mean nothing without cycles of seats and deadlines
_SYNC_ONLY = ("cycle_length", "min_diffs", "max_diffs", "min_workers", "max_workers")


def normalize(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check ``mode`` and the async keys of a server_config (the other keys already
    checked, ``strategy`` not yet normalized); returns it with ``mode`` and, in async mode,
    every async key filled in. Raises :class:`ConfigError` saying what to fix."""
    out = dict(cfg)
    mode = out.get("mode", "sync")
    if mode not in ("sync", "async"):
        raise ConfigError(f"server_config.mode must be 'sync' or 'async'; got {mode!r}")
    out["mode"] = mode
    if mode == "sync":
        given = sorted(k for k in ASYNC_DEFAULTS if out.get(k) is not None)
        if given:
            raise ConfigError(
                f"server_config: {given} only apply with mode 'async' (buffered asynchronous "
                "aggregation); set server_config.mode to 'async' or drop them"
            )
        for key in ASYNC_DEFAULTS:
            out[key] = None
        return out
    for key in _SYNC_ONLY:
        if out.get(key) is not None:
            raise ConfigError(
                f"server_config.{key} does not apply with mode 'async': a buffer completes "
                "after buffer_size reports, admits every worker and has no deadline; drop it"
            )
    if (out.get("do_not_reuse_workers_until_cycle") or 0) > 1 or out.get("iterative_plan"):
        raise ConfigError(
            "server_config: do_not_reuse_workers_until_cycle and iterative_plan do not apply "
            "with mode 'async'; drop them"
        )
    for key, default in ASYNC_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = default
    for key in ("buffer_size", "max_staleness"):
        v, low = out[key], 1 if key == "buffer_size" else 0
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 1 << 31:
            raise ConfigError(f"server_config.{key} must be an integer >= {low}; got {v!r}")
    lr = out["server_lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ConfigError(f"server_config.server_lr must be a number > 0; got {lr!r}")
    out["server_lr"] = float(lr)
    out["staleness_weight"] = _weight_config(out["staleness_weight"])
    # the raw strategy object: strategies.normalize checks the rest of it afterwards
    strategy = out.get("strategy")
    name = strategy.get("name") if isinstance(strategy, dict) else None
    if name in strategies.ROBUST:
        raise ConfigError(
            f"server_config.strategy {name!r} needs every diff of a cycle; mode 'async' folds "
            "each report into a running mean: use fedavg or a server optimizer "
            f"({', '.join(sorted(strategies.OPTIMIZERS))})"
        )
    if name in strategies.OPTIMIZERS and out["server_lr"] != 1.0:
        raise ConfigError(
            f"server_config.server_lr: with strategy {name!r} the optimizer's own rate is "
            "the server learning rate; drop server_lr"
        )
    return out


def _weight_config(raw: Any) -> dict[str, Any]:
    where = "server_config.staleness_weight"
    if not isinstance(raw, dict) or raw.get("name") not in WEIGHTS:
        raise ConfigError(
            f'{where} must be an object {{"name": ...}} with name one of {sorted(WEIGHTS)}; '
            f"got {raw!r}"
        )
    params = WEIGHTS[raw["name"]]
    unknown = sorted(set(raw) - {"name", *params})
    if unknown:
        raise ConfigError(f"{where}: {raw['name']} has no {unknown}; it takes {sorted(params)}")
    out: dict[str, Any] = {"name": raw["name"]}
    for key, default in params.items():
        v = raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
            raise ConfigError(f"{where}.{key} must be a number in [0, 10]; got {v!r}")
        out[key] = float(v)
    return out


def staleness_weight(cfg: dict[str, Any], staleness: int) -> float:
    """``s(τ)`` for a report ``staleness`` checkpoints behind the current one.

    >>> staleness_weight({"staleness_weight": {"name": "constant"}}, 7)
    1.0
    >>> staleness_weight({"staleness_weight": {"name": "polynomial", "exponent": 1.0}}, 3)
    0.25
    """
    weight = cfg["staleness_weight"]
    if weight["name"] == "constant":
        return 1.0
    return float((1.0 + staleness) ** -weight["exponent"])


def too_stale(cfg: dict[str, Any], staleness: int, trained_on: int, latest: int) -> str | None:
    """Why a report is refused for its staleness, or ``None`` when it is fresh enough.

    >>> too_stale({"max_staleness": 2}, 3, trained_on=4, latest=7)  # doctest: +ELLIPSIS
    'this report is 3 checkpoints stale (trained on checkpoint 4, the latest is 7); ...'
    """
    limit = cfg["max_staleness"]
    if staleness <= limit:
        return None
    return (
        f"this report is {staleness} checkpoints stale (trained on checkpoint {trained_on}, "
        f"the latest is {latest}); server_config.max_staleness is {limit}: request a cycle "
        "again to train on the latest checkpoint"
    )


def fold(
    strategy: agg.Strategy, sums: agg.RunningSums, diff: Sequence[np.ndarray], scale: float
) -> None:
    """Add ``scale * clip(diff)`` to the buffer's unweighted sum (``sum_x``), whose mean
    over the ``count_x`` reports is then ``(1/K) Σ scale_k Δ_k``: the strategy's
    ``combine`` (a plain mean) and ``step`` then publish it."""
    clipped = agg.clip_l2(diff, strategy.clip_norm)
    if sums.sum_x is None:
        sums.sum_x = agg.new_sum(sums.spec)
    agg.fold(sums.sum_x, clipped, sums.spec, weight=scale)
    sums.count_x += 1
    sums.changed = "x"
