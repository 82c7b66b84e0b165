"""The catalogue of aggregation strategies: ``server_config.strategy`` validated at hosting,
and the :class:`~gridfl.server.aggregate.Strategy` a process aggregates with.

Names, hyperparameters and defaults follow Flower's strategies (its message API where the
two APIs differ), so that a config moves across; docs/configs.md states each one, and
where gridfl follows the paper rather than Flower.

>>> normalize({"name": "fedadam", "eta": 0.01}, max_diffs=None)["beta_2"]
0.99
>>> normalize({"name": "krum", "num_malicious_nodes": 2}, max_diffs=6)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
gridfl._exceptions.ConfigError: server_config.strategy: krum ... needs max_diffs >= 7 ...
"""

from __future__ import annotations

import math
from typing import Any

from gridfl._exceptions import ConfigError
from gridfl.server import aggregate as agg
from gridfl.server import optimizers, robust

_RATE = "rate"  # a number > 0
_UNIT = "unit"  # a number in [0, 1)
_TRIM = "trim"  # a number in [0, 0.5)
_COUNT = "count"  # an integer >= 0
_SELECT = "select"  # an integer >= 1
_NONNEG = "nonneg"  # a number >= 0
_REQUIRED = object()  # a hyperparameter without a default

#: name -> {hyperparameter: (kind, default)}
SPECS: dict[str, dict[str, tuple[str, Any]]] = {
    "fedavg": {},
    # Flower's FedProx(proximal_mu) has no default either
    "fedprox": {"proximal_mu": (_NONNEG, _REQUIRED)},
    "fedavgm": {"server_learning_rate": (_RATE, 1.0), "server_momentum": (_UNIT, 0.0)},
    "fedadagrad": {"eta": (_RATE, 0.1), "beta_1": (_UNIT, 0.0), "tau": (_RATE, 1e-3)},
    "fedadam": {
        "eta": (_RATE, 0.1),
        "beta_1": (_UNIT, 0.9),
        "beta_2": (_UNIT, 0.99),
        "tau": (_RATE, 1e-3),
    },
    "fedyogi": {
        "eta": (_RATE, 0.01),
        "beta_1": (_UNIT, 0.9),
        "beta_2": (_UNIT, 0.99),
        "tau": (_RATE, 1e-3),
    },
    "fedmedian": {},
    "fedtrimmedavg": {"beta": (_TRIM, 0.2)},
    "krum": {"num_malicious_nodes": (_COUNT, 0)},
    "multikrum": {"num_malicious_nodes": (_COUNT, 0), "num_nodes_to_select": (_SELECT, 1)},
    "bulyan": {"num_malicious_nodes": (_COUNT, 0)},
}

#: strategies that need every diff of a cycle (kept in the database until it closes)
ROBUST = {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}
#: server optimizers (Reddi et al.; Hsu et al.): state carried from cycle to cycle
OPTIMIZERS = {"fedavgm", "fedadagrad", "fedadam", "fedyogi"}
#: aggregate with FedAvg's weighted mean (FedProx changes only the workers' loss)
MEAN = {"fedavg", "fedprox"}
#: plan variants syft.js runs: they carry no proximal term
_SYFTJS_VARIANTS = ("tfjs", "torchscript", "list")

_KIND_TEXT = {
    _RATE: "a number > 0",
    _UNIT: "a number in [0, 1)",
    _TRIM: "a number in [0, 0.5)",
    _COUNT: "an integer >= 0",
    _SELECT: "an integer >= 1",
    _NONNEG: "a number >= 0",
}


def _valid(kind: str, v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if kind in (_COUNT, _SELECT):
        return isinstance(v, int) and v >= (0 if kind == _COUNT else 1) and v < 1 << 31
    if not math.isfinite(v):
        return False
    if kind == _RATE:
        return v > 0
    if kind == _NONNEG:
        return v >= 0
    return 0 <= v < (1.0 if kind == _UNIT else 0.5)


def normalize(
    raw: Any, *, max_diffs: int | None, min_diffs: int | None = None
) -> dict[str, Any] | None:
    """The validated strategy object, every hyperparameter present; ``None`` for absent
    (FedAvg, as when no strategy is given). Raises :class:`ConfigError` saying what to fix."""
    if raw is None:
        return None
    where = "server_config.strategy"
    if not isinstance(raw, dict):
        raise ConfigError(f'{where} must be an object such as {{"name": "fedadam"}}')
    name = raw.get("name")
    if name not in SPECS:
        raise ConfigError(f"{where}.name must be one of {sorted(SPECS)}; got {name!r}")
    spec = SPECS[name]
    allowed = {"name", "clip_norm", *spec}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        takes = sorted(allowed - {"name"})
        raise ConfigError(f"{where}: {name} has no {unknown}; it takes {takes}")
    out: dict[str, Any] = {"name": name}
    for key, (kind, default) in spec.items():
        if default is _REQUIRED and key not in raw:
            raise ConfigError(f"{where}: {name} needs {key} ({_KIND_TEXT[kind]})")
        v = raw.get(key, default)
        if not _valid(kind, v):
            raise ConfigError(f"{where}.{key} must be {_KIND_TEXT[kind]}; got {v!r}")
        out[key] = v
    clip = raw.get("clip_norm")
    if clip is not None and not _valid(_RATE, clip):
        raise ConfigError(f"{where}.clip_norm must be a number > 0 or null; got {clip!r}")
    out["clip_norm"] = clip
    if name in ROBUST:
        _check_robust(out, max_diffs, min_diffs)
    return out


def _check_robust(cfg: dict[str, Any], max_diffs: int | None, min_diffs: int | None) -> None:
    name = cfg["name"]
    if max_diffs is None:
        raise ConfigError(
            f"server_config.strategy: {name} keeps every diff of a cycle until it closes; "
            "set server_config.max_diffs to bound how many (memory is max_diffs x model size)"
        )
    f = cfg.get("num_malicious_nodes", 0)
    need = robust.min_reports(name, f)
    if max_diffs < need:
        rule = "n >= 4f + 3" if name == "bulyan" else "n > 2f + 2"
        raise ConfigError(
            f"server_config.strategy: {name} with num_malicious_nodes = {f} needs "
            f"max_diffs >= {need} ({rule}); max_diffs is {max_diffs}"
        )
    m = cfg.get("num_nodes_to_select")
    if m is not None and m > max_diffs - f:
        raise ConfigError(
            f"server_config.strategy.num_nodes_to_select must be <= max_diffs - "
            f"num_malicious_nodes = {max_diffs - f}; got {m}"
        )
    if m is not None:
        need = max(need, m + f)
    if min_diffs is not None and min_diffs < need:
        raise ConfigError(
            f"server_config.min_diffs must be >= {need} for {name} with num_malicious_nodes "
            f"= {f}: a cycle closing with fewer reports could not be aggregated"
        )


def check_hosting(cfg: dict[str, Any] | None, spec: agg.ModelSpec, has_averaging_plan: bool):
    """What the strategy needs from the rest of the host request."""
    if cfg is None:
        return
    if has_averaging_plan and (cfg["name"] != "fedavg" or cfg["clip_norm"] is not None):
        raise ConfigError(
            "server_config.strategy: a hosted averaging_plan is the aggregation rule; "
            "drop the averaging_plan to use a strategy, or the strategy to use the plan"
        )
    float_only = all(dt.kind == "f" for dt in spec.dtypes)
    if not float_only and (cfg["clip_norm"] is not None or cfg["name"] not in MEAN):
        raise ConfigError(
            f"server_config.strategy: {cfg['name']} (and clip_norm) works on float tensors; "
            "the model has integer or boolean tensors: use fedavg or fedprox without clip_norm"
        )


def strategy_for(cfg: dict[str, Any] | None, averaging_plan=None) -> agg.Strategy:
    """The :class:`~gridfl.server.aggregate.Strategy` of a validated strategy object."""
    if averaging_plan is not None:
        return agg.IterativeAveraging(averaging_plan)
    if cfg is None:
        return agg.FED_AVG
    name = cfg["name"]
    params = {k: v for k, v in cfg.items() if k in SPECS[name]}
    clip = cfg["clip_norm"]
    if name in MEAN:
        return agg.FedAvg(clip_norm=clip)
    if name in OPTIMIZERS:
        return optimizers.build(name, params, clip_norm=clip)
    return robust.build(name, params, clip_norm=clip)


def check_proximal(
    cfg: dict[str, Any] | None, plans: dict[str, tuple[Any, list[str]]], client_config: dict
) -> dict:
    """FedProx at hosting: every training plan takes the global params and ``proximal_mu``,
    which the node sends in ``client_config`` (as Flower sends it in the fit config).
    ``plans`` maps a plan's name to its loaded onnx plan (or None) and its variants.
    Returns the ``client_config`` workers receive.

        >>> check_proximal(None, {}, {"name": "m"})
        {'name': 'm'}
    """
    where = "server_config.strategy"
    fedprox = cfg is not None and cfg["name"] == "fedprox"
    for name, (plan, variants) in plans.items():
        training = plan is None or plan.kind == "training"
        takes_global = plan is not None and any(s.role == "global_param" for s in plan.inputs)
        if takes_global and not fedprox:
            raise ConfigError(
                f"plans.{name} takes FedProx global params (compiled with proximal_mu): "
                f'host it with server_config.strategy = {{"name": "fedprox", "proximal_mu": ...}}'
            )
        if not (fedprox and training):
            continue
        syftjs = sorted(set(variants) & set(_SYFTJS_VARIANTS))
        if syftjs:
            raise ConfigError(
                f"{where}: fedprox cannot serve plans.{name} as {syftjs}: syft.js runs those "
                "variants, which have no proximal term, so its workers would silently train "
                "FedAvg; host the onnx plan only"
            )
        if not takes_global or "proximal_mu" not in plan.client_config_keys:
            raise ConfigError(
                f"{where}: fedprox needs training plans with global_param inputs and a "
                f"client_config 'proximal_mu' input; plans.{name} has none: compile it "
                "with compile_training_plan(..., proximal_mu=...)"
            )
    if not fedprox:
        return client_config
    assert cfg is not None
    mu = cfg["proximal_mu"]
    if client_config.get("proximal_mu", mu) != mu:
        raise ConfigError(
            f"client_config.proximal_mu is {client_config['proximal_mu']!r} but "
            f"{where}.proximal_mu is {mu!r}: the node sends the strategy's value to workers; "
            "drop client_config.proximal_mu"
        )
    return {**client_config, "proximal_mu": mu}
