"""``server_config.differential_privacy``: validation at host time and the typed view the
node works from. docs/privacy.md documents each key, its default and the checks.

    >>> dp = validate_differential_privacy(
    ...     {"noise_multiplier": 1.0, "clip_norm": 0.5, "population_size": 1000},
    ...     {"max_workers": 100, "over_selection": 1.0, "max_diffs": None, "min_diffs": None},
    ... )
    >>> dp["mode"], dp["delta"], dp["accountant"]
    ('central', 1e-05, 'rdp')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gridfl import privacy
from gridfl._exceptions import ConfigError
from gridfl.server.strategies import ROBUST

_KEY = "server_config.differential_privacy"

#: key -> default (``...``: required)
DP_DEFAULTS: dict[str, Any] = {
    "mode": "central",
    "noise_multiplier": ...,
    "clip_norm": ...,
    "delta": None,  # min(1e-5, 0.1 / population_size)
    "population_size": ...,
    "max_epsilon": None,
    "accountant": "rdp",
}
#: adaptive clip_norm key -> default (Andrew et al. 2021; Flower uses the same)
ADAPTIVE_DEFAULTS: dict[str, Any] = {
    "initial": ...,
    "target_quantile": 0.5,
    "learning_rate": 0.2,
    "count_stddev": None,  # max(expected reports / 20, z) when z > 0, else 0
}
#: largest noise multiplier accepted (z = 1e3 already drowns any model in noise)
MAX_NOISE_MULTIPLIER = 1e3
#: distributed mode with secure aggregation: the per-value clipping range must hold C plus
#: this many standard deviations of a worker's noise, so that quantization clips an honest
#: value with probability below 2e-9 (P(|N(0, 1)| > 6) = 1.97e-9)
RANGE_SIGMAS = 6.0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, key: str, what: str, v: Any) -> None:
    if not ok:
        raise ConfigError(f"{_KEY}.{key} must be {what}; got {v!r}"[:300])


def _fill(given: dict, defaults: dict, where: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    missing = [k for k, d in defaults.items() if d is ... and k not in given]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} required (see docs/privacy.md)")
    return {**defaults, **given}


def expected_reports(server_config: dict[str, Any]) -> int:
    """DP-FedAvg's fixed denominator m: the reports a cycle completes with (``max_diffs``,
    else ``max_workers``)."""
    return int(server_config.get("max_diffs") or server_config["max_workers"])


def workers_per_cycle(server_config: dict[str, Any]) -> int:
    """The most workers one cycle accepts: ``ceil(max_workers * over_selection)``."""
    from gridfl.server.config import worker_capacity

    cap = worker_capacity(server_config)
    assert cap is not None  # max_workers is required with differential privacy
    return cap


def validate_differential_privacy(dp: Any, server_config: dict[str, Any]) -> dict | None:
    """The normalized ``differential_privacy`` object (defaults filled in), or ``None``;
    ``server_config`` is the rest of the already validated server_config.
    Raises :class:`~gridfl.ConfigError` saying what is wrong."""
    if dp is None:
        return None
    if not isinstance(dp, dict):
        raise ConfigError(f"{_KEY} must be an object or null")
    out = _fill(dp, DP_DEFAULTS, _KEY)
    _check(
        out["mode"] in ("central", "distributed"), "mode", "'central' or 'distributed'", out["mode"]
    )
    z = out["noise_multiplier"]
    _check(
        _number(z) and 0 <= z <= MAX_NOISE_MULTIPLIER,
        "noise_multiplier",
        f"a number >= 0 (at most {MAX_NOISE_MULTIPLIER:g})",
        z,
    )
    n = out["population_size"]
    _check(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1,
        "population_size",
        "an integer >= 1 (how many workers may ever take part)",
        n,
    )
    if server_config.get("max_workers") is None:
        raise ConfigError(
            f"{_KEY} needs server_config.max_workers: the sampling rate is workers per "
            "cycle / population_size"
        )
    strategy = server_config.get("strategy") or {}
    if strategy.get("name") in ROBUST or strategy.get("clip_norm") is not None:
        raise ConfigError(
            f"{_KEY} needs a strategy that works from the sum of clipped diffs (fedavg or a "
            "server optimizer, without strategy.clip_norm: differential_privacy.clip_norm "
            f"clips); got {strategy}"[:300]
        )
    if server_config.get("iterative_plan"):
        raise ConfigError(
            f"{_KEY} cannot be used with an iterative averaging plan: the noise is calibrated "
            "to a sum of clipped diffs divided by a fixed count"
        )
    per_cycle = workers_per_cycle(server_config)
    if n < per_cycle:
        raise ConfigError(
            f"{_KEY}.population_size ({n}) is smaller than the workers a cycle accepts "
            f"(max_workers x over_selection = {per_cycle}): the sampling rate would exceed 1"
        )
    m = expected_reports(server_config)
    if out["delta"] is None:
        out["delta"] = min(1e-5, 0.1 / n)
    delta = out["delta"]
    _check(_number(delta) and 0 < delta < 1, "delta", "a number in (0, 1)", delta)
    if delta >= 1 / n:
        raise ConfigError(
            f"{_KEY}.delta ({delta:g}) must be below 1 / population_size ({1 / n:g}): a "
            "mechanism that publishes one random worker's data outright meets delta = 1/n"
        )
    out["clip_norm"] = _clip_norm(out["clip_norm"], z, m)
    _check(
        out["accountant"] in privacy.ACCOUNTANTS, "accountant", "'rdp' or 'pld'", out["accountant"]
    )
    max_eps = out["max_epsilon"]
    _check(
        max_eps is None or (_number(max_eps) and max_eps > 0),
        "max_epsilon",
        "a number > 0 or null",
        max_eps,
    )
    _check_mode(out, server_config, m)
    z_accounted = accounted_noise_multiplier(out, server_config)
    if out["accountant"] == "pld" and z_accounted < privacy.PLD_MIN_NOISE:
        raise ConfigError(
            f"{_KEY}.accountant 'pld' needs noise_multiplier >= {privacy.PLD_MIN_NOISE} (below, "
            "its privacy loss distributions take gigabytes; under secure aggregation, "
            "z sqrt(min_survivors / m) is what counts); use 'rdp'"
        )
    _check_budget(out, z_accounted, per_cycle / n)
    return out


def accounted_noise_multiplier(dp: dict, server_config: dict[str, Any]) -> float:
    """The noise multiplier the accountant charges each cycle. In distributed mode with
    secure aggregation a cycle may complete with as few as ``min_survivors`` s of the m
    expected reports, each carrying 1/m of the noise variance: the sum then has
    ``z sqrt(s / m)`` of noise, and every cycle is accounted at that worst case (``z``
    itself when ``min_survivors >= m``). Elsewhere it is ``z``."""
    z = float(dp["noise_multiplier"])
    secure = server_config.get("secure_aggregation")
    if dp["mode"] != "distributed" or not secure:
        return z
    m = expected_reports(server_config)
    return z * math.sqrt(min(int(secure["min_survivors"]), m) / m)


def _check_mode(out: dict, server_config: dict[str, Any], m: int) -> None:
    """What each mode needs from the rest of server_config."""
    if out["mode"] == "central" and server_config.get("secure_aggregation"):
        raise ConfigError(
            f"{_KEY}.mode 'central' cannot be used with secure aggregation: the node never "
            "sees a report to clip; use mode 'distributed'"
        )
    if out["mode"] == "distributed":
        if isinstance(out["clip_norm"], dict):
            raise ConfigError(
                f"{_KEY}.clip_norm: adaptive clipping needs each report's clipped-or-not bit, "
                "which the node sees only in the clear (and, under secure aggregation, would "
                "have to be summed securely with its own noise); in mode 'distributed' give "
                "a fixed clip_norm"
            )
        secure = server_config.get("secure_aggregation")
        if secure:
            _check_secure_aggregation(out, secure, server_config)
        elif (server_config.get("min_diffs") or 1) < m:
            raise ConfigError(
                f"{_KEY}.mode 'distributed' needs server_config.min_diffs >= {m} (the "
                "expected reports): each worker adds 1/m of the noise, so a cycle with fewer "
                "reports would be under-noised"
            )


def _check_secure_aggregation(out: dict, secure: dict, server_config: dict[str, Any]) -> None:
    """Distributed mode under secure aggregation: every honest value, clipped diff plus the
    worker's noise, must fit the quantization range (see :data:`RANGE_SIGMAS`). The field
    holds the sum without wrapping: secure aggregation's own check bounds
    ``workers x max_num_samples x 2^(quantization_bits - 1)``, and with differential
    privacy every weight is 1."""
    c = float(out["clip_norm"])
    sigma = out["noise_multiplier"] * c / math.sqrt(expected_reports(server_config))
    need = c + RANGE_SIGMAS * sigma
    if secure["clipping_range"] < need:
        raise ConfigError(
            f"server_config.secure_aggregation.clipping_range ({secure['clipping_range']:g}) "
            f"must hold {_KEY}.clip_norm plus {RANGE_SIGMAS:g} standard deviations of a "
            f"worker's noise (C + {RANGE_SIGMAS:g} z C / sqrt(m) = {need:.6g}): otherwise "
            "quantization clips honest values and changes the noise; raise clipping_range "
            "(and quantization_bits to keep the resolution)"
        )


def _check_budget(out: dict, z: float, sampling_rate: float) -> None:
    """A budget needs noise, and must allow one cycle at least (``z``: the accounted
    noise multiplier)."""
    max_eps = out["max_epsilon"]
    if max_eps is not None:
        if z == 0:
            raise ConfigError(
                f"{_KEY}.max_epsilon cannot be met with noise_multiplier 0 (epsilon is "
                "infinite): set max_epsilon to null to clip without noise"
            )
        first = privacy.epsilon(sampling_rate, z, 1, out["delta"], out["accountant"])
        if first > max_eps:
            raise ConfigError(
                f"{_KEY}: one cycle alone spends epsilon {first:.4g} > max_epsilon {max_eps:g}; "
                "raise noise_multiplier or population_size, or max_epsilon (or, under "
                "secure aggregation, min_survivors)"
            )


def _clip_norm(c: Any, z: float, m: int) -> float | dict:
    if not isinstance(c, dict):
        _check(_number(c) and c > 0, "clip_norm", "a number > 0 or an adaptive object", c)
        return float(c)
    out = _fill(c, ADAPTIVE_DEFAULTS, f"{_KEY}.clip_norm")
    _check(
        _number(out["initial"]) and out["initial"] > 0,
        "clip_norm.initial",
        "a number > 0",
        out["initial"],
    )
    g = out["target_quantile"]
    _check(_number(g) and 0 < g < 1, "clip_norm.target_quantile", "a number in (0, 1)", g)
    lr = out["learning_rate"]
    _check(_number(lr) and lr > 0, "clip_norm.learning_rate", "a number > 0", lr)
    if out["count_stddev"] is None:
        # the paper's m/20, but at least z, so that the update keeps most of the budget
        # (z_delta <= 1.155 z) however few reports a cycle expects
        out["count_stddev"] = max(m / 20, z) if z > 0 else 0.0
    s = out["count_stddev"]
    _check(_number(s) and s >= 0, "clip_norm.count_stddev", "a number >= 0 or null", s)
    if z > 0 and not 2 * s > z:
        raise ConfigError(
            f"{_KEY}.clip_norm.count_stddev ({s:g}) must be more than noise_multiplier / 2 "
            f"({z / 2:g}): the count's noise is part of the privacy budget (Andrew et al.)"
        )
    return out


@dataclass(frozen=True)
class DPConfig:
    """The typed view of a process's validated ``differential_privacy`` object."""

    mode: str
    noise_multiplier: float
    initial_clip_norm: float
    adaptive: dict | None
    delta: float
    population_size: int
    max_epsilon: float | None
    accountant: str
    expected_reports: int
    sampling_rate: float
    #: what the accountant charges per cycle (:func:`accounted_noise_multiplier`)
    accounted_noise_multiplier: float

    @classmethod
    def of(cls, server_config: dict[str, Any]) -> DPConfig | None:
        dp = server_config.get("differential_privacy")
        if not dp:
            return None
        c = dp["clip_norm"]
        adaptive = c if isinstance(c, dict) else None
        return cls(
            mode=dp["mode"],
            noise_multiplier=float(dp["noise_multiplier"]),
            initial_clip_norm=float(adaptive["initial"] if adaptive else c),
            adaptive=adaptive,
            delta=float(dp["delta"]),
            population_size=int(dp["population_size"]),
            max_epsilon=dp["max_epsilon"],
            accountant=dp["accountant"],
            expected_reports=expected_reports(server_config),
            sampling_rate=workers_per_cycle(server_config) / int(dp["population_size"]),
            accounted_noise_multiplier=accounted_noise_multiplier(dp, server_config),
        )

    @property
    def update_noise_multiplier(self) -> float:
        """z for the update: z itself, or z_delta when the adaptive count takes a share."""
        if self.adaptive is None:
            return self.noise_multiplier
        return privacy.noise_split(self.noise_multiplier, self.adaptive["count_stddev"])

    def epsilon(self, steps: int) -> float:
        """ε(δ) after ``steps`` completed cycles (:func:`gridfl.privacy.epsilon`)."""
        return privacy.epsilon(
            self.sampling_rate, self.accounted_noise_multiplier, steps, self.delta, self.accountant
        )

    def for_workers(self) -> dict[str, Any]:
        """What a worker needs in distributed mode (sent in its ``client_config``)."""
        return {
            "mode": self.mode,
            "clip_norm": self.initial_clip_norm,
            "noise_stddev": self.noise_multiplier
            * self.initial_clip_norm
            / math.sqrt(self.expected_reports),
        }
