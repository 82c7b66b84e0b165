"""Validation of ``client_config`` and ``server_config`` at host time.

Every key of PyGrid's ``server_config`` is enforced; unknown or ill-typed keys are refused
with :class:`gridfl.ConfigError`. docs/configs.md documents each key and its default.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlparse

from gridfl import compression
from gridfl._exceptions import ConfigError
from gridfl._messages import check_json_values
from gridfl.server import fedbuff, strategies
from gridfl.server.dp_config import validate_differential_privacy

#: key -> default of the normalized server_config
SERVER_DEFAULTS: dict[str, Any] = {
    "cycle_length": None,
    "num_cycles": 0,
    "min_diffs": None,
    "max_diffs": None,
    "min_workers": None,
    "max_workers": None,
    "over_selection": 1.0,
    "pool_selection": "iterate",
    "do_not_reuse_workers_until_cycle": 0,
    "minimum_upload_speed": None,
    "minimum_download_speed": None,
    "iterative_plan": False,
    "authentication": None,
    # null = off; an object {"window": seconds} (true: the default window)
    "pace_steering": None,
    # null = FedAvg; gridfl.server.strategies validates it
    "strategy": None,
    # docs/privacy.md; validated by gridfl.server.dp_config
    "differential_privacy": None,
    # null = off; {"kind": "float16" | "int8" | "topk", "fraction"?} (gridfl.compression)
    "compression": None,
    # "sync" (cycles) or "async" (FedBuff buffers); gridfl.server.fedbuff validates these
    "mode": "sync",
    **{key: None for key in fedbuff.ASYNC_DEFAULTS},
    "secure_aggregation": None,
    # "report": every accepted report survives a crash; "cycle": running sums in memory
    "durability": "report",
    # null = off; {"every": n, "max_workers": m, "seat_timeout": s} (federated evaluation,
    # docs/configs.md)
    "evaluation": None,
}

#: pace steering's default selection window: how long a cycle should take to fill, seconds
PACE_WINDOW = 60.0

_AUTH_KEYS = {"type", "secret", "pub_key", "endpoint"}


#: largest integer a server_config key takes (a 32-bit database integer)
MAX_INT = (1 << 31) - 1
#: shortest and longest cycle_length (seconds): a cycle shorter than a second expires and
#: reopens faster than any worker can join it; a year is longer than any process runs
MIN_CYCLE_LENGTH = 1.0
MAX_CYCLE_LENGTH = 365 * 24 * 3600.0
#: largest over_selection (accepting 100x max_workers is already absurd)
MAX_OVER_SELECTION = 100.0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _int(cfg: dict, key: str, *, minimum: int, nullable: bool) -> None:
    v = cfg[key]
    if v is None and nullable:
        return
    if not _is_int(v) or not minimum <= v <= MAX_INT:
        null = " or null" if nullable else ""
        raise ConfigError(
            f"server_config.{key} must be an integer >= {minimum} (at most {MAX_INT}){null}; "
            f"got {_short(v)}"
        )


def _short(v: Any) -> str:
    text = repr(v) if not _is_int(v) or abs(v) < 10**30 else f"an integer of {len(str(v))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _num(
    cfg: dict,
    key: str,
    *,
    minimum: float,
    nullable: bool,
    strict: bool = False,
    maximum: float | None = None,
) -> None:
    v = cfg[key]
    if v is None and nullable:
        return
    if (
        not _is_num(v)
        or v < minimum
        or (strict and v == minimum)
        or (maximum is not None and v > maximum)
    ):
        op = ">" if strict else ">="
        top = f" and <= {maximum:g}" if maximum is not None else ""
        null = " or null" if nullable else ""
        raise ConfigError(
            f"server_config.{key} must be a number {op} {minimum}{top}{null}; got {_short(v)}"
        )
    cfg[key] = float(v) if isinstance(v, float) else v


def _encodes(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_client_config(cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ConfigError("client_config must be an object")
    # every worker is sent it as JSON: no NaN, no Infinity, text a database stores
    check_json_values(cfg, "client_config")
    for key in ("name", "version"):
        v = cfg.get(key)
        if not isinstance(v, str) or not v or len(v) > 255:
            raise ConfigError(f"client_config.{key} is required: a non-empty string (<= 255)")
        if "\x00" in v or not _encodes(v):
            raise ConfigError(
                f"client_config.{key} must not contain control character NUL or lone surrogates"
            )
    return dict(cfg)


def validate_authentication(auth: Any) -> dict[str, Any] | None:
    if auth is None:
        return None
    if not isinstance(auth, dict):
        raise ConfigError("server_config.authentication must be an object or null")
    unknown = set(auth) - _AUTH_KEYS
    if unknown:
        raise ConfigError(f"server_config.authentication: unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {}
    if auth.get("type") not in (None, "jwt"):
        raise ConfigError("server_config.authentication.type must be 'jwt' if given")
    secret = auth.get("secret")
    if secret is not None:
        if not isinstance(secret, str) or not secret:
            raise ConfigError("server_config.authentication.secret must be a non-empty string")
        if "-----BEGIN" in secret:
            raise ConfigError("authentication.secret looks like a PEM key; use pub_key for RS256")
        out["secret"] = secret
    pub_key = auth.get("pub_key")
    if pub_key is not None:
        if not isinstance(pub_key, str):
            raise ConfigError("server_config.authentication.pub_key must be a PEM string")
        try:
            from jwt.algorithms import RSAAlgorithm

            RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(pub_key)
        except Exception as e:
            raise ConfigError(f"server_config.authentication.pub_key is not an RSA key: {e}") from e
        out["pub_key"] = pub_key
    endpoint = auth.get("endpoint")
    if endpoint is not None:
        u = urlparse(endpoint) if isinstance(endpoint, str) else None
        if u is None or u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError("server_config.authentication.endpoint must be an http(s) URL")
        out["endpoint"] = endpoint
    return out or None


def validate_server_config(cfg: Any) -> dict[str, Any]:
    """Return the normalized server_config (every key present, defaults filled in)."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError("server_config must be an object")
    check_json_values(cfg, "server_config")
    unknown = set(cfg) - set(SERVER_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"server_config: unknown keys {sorted(unknown)}; known: {sorted(SERVER_DEFAULTS)}"
        )
    out = {**SERVER_DEFAULTS, **cfg}
    _num(
        out, "cycle_length", minimum=MIN_CYCLE_LENGTH, nullable=True, maximum=MAX_CYCLE_LENGTH
    )
    _int(out, "num_cycles", minimum=0, nullable=False)
    for key in ("min_diffs", "max_diffs", "max_workers"):
        _int(out, key, minimum=1, nullable=True)
    _int(out, "min_workers", minimum=0, nullable=True)
    _num(out, "over_selection", minimum=1.0, nullable=False, maximum=MAX_OVER_SELECTION)
    _int(out, "do_not_reuse_workers_until_cycle", minimum=0, nullable=False)
    _num(out, "minimum_upload_speed", minimum=0, nullable=True)
    _num(out, "minimum_download_speed", minimum=0, nullable=True)
    if out["pool_selection"] not in ("random", "iterate"):
        raise ConfigError("server_config.pool_selection must be 'random' or 'iterate'")
    if not isinstance(out["iterative_plan"], bool):
        raise ConfigError("server_config.iterative_plan must be true or false")
    if out["min_diffs"] and out["max_diffs"] and out["max_diffs"] < out["min_diffs"]:
        raise ConfigError("server_config.max_diffs must be >= min_diffs")
    if out["min_workers"] and out["max_workers"] and out["max_workers"] < out["min_workers"]:
        raise ConfigError("server_config.max_workers must be >= min_workers")
    if out["min_diffs"] and out["max_workers"] and out["max_workers"] < out["min_diffs"]:
        raise ConfigError("server_config.max_workers must be >= min_diffs")
    out["authentication"] = validate_authentication(out["authentication"])
    out["pace_steering"] = validate_pace_steering(out["pace_steering"])
    out = fedbuff.normalize(out)  # first: it says why a robust rule cannot run async
    out["strategy"] = strategies.normalize(
        out["strategy"], max_diffs=out["max_diffs"], min_diffs=out["min_diffs"]
    )
    out["compression"] = compression.validate_config(out["compression"])
    if out["compression"] is not None and out["mode"] == "async":
        raise ConfigError(
            "server_config.compression is not available with mode 'async' yet: "
            "remove one of them"
        )
    # secure aggregation first: distributed privacy checks its range and min_survivors
    out["secure_aggregation"] = validate_secure_aggregation(out)
    out["differential_privacy"] = validate_differential_privacy(out["differential_privacy"], out)
    validate_durability(out)
    out["evaluation"] = validate_evaluation(out)
    return out


def validate_durability(cfg: dict[str, Any]) -> None:
    """``"report"`` or ``"cycle"`` (docs/scaling.md); ``"cycle"`` keeps the running sums
    in memory, so only rules that fold into sums in cycles may use it."""
    value = cfg["durability"]
    if value not in ("report", "cycle"):
        raise ConfigError(
            f"server_config.durability must be 'report' (every accepted report survives a "
            f"crash) or 'cycle' (running sums in memory; a crash expires the open cycle), "
            f"not {_short(value)}"
        )
    if value == "report":
        return
    strategy = cfg["strategy"]
    clashes = {
        "mode 'async'": cfg["mode"] == "async",
        # their rules keep every diff of the cycle, which "report" stores row by row
        f"strategy {strategy and strategy['name']!r}": strategy is not None
        and strategy["name"] in strategies.ROBUST,
    }
    for clash, present in clashes.items():
        if present:
            raise ConfigError(
                f"server_config.durability 'cycle' is not available with {clash} yet: use "
                "durability 'report' (the default)"
            )


def validate_evaluation(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``server_config.evaluation`` normalized to ``{"every", "max_workers",
    "seat_timeout"}``, or None; refused where the node would release what the process
    promises to keep private. ``seat_timeout`` null: the cycle's ``cycle_length``
    (:func:`gridfl.server.evaluation.seat_timeout`)."""
    value = cfg["evaluation"]
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"every", "max_workers", "seat_timeout"}:
        raise ConfigError(
            'server_config.evaluation must be null or {"every": n, "max_workers": m, '
            '"seat_timeout": seconds or null}'
        )
    out = {
        "evaluation.every": value.get("every", 1),
        "evaluation.max_workers": value.get("max_workers"),
        "evaluation.seat_timeout": value.get("seat_timeout"),
    }
    _int(out, "evaluation.every", minimum=1, nullable=False)
    _int(out, "evaluation.max_workers", minimum=1, nullable=True)
    _num(out, "evaluation.seat_timeout", minimum=MIN_CYCLE_LENGTH, nullable=True,
         maximum=MAX_CYCLE_LENGTH)
    if cfg["mode"] == "async":
        raise ConfigError(
            "server_config.evaluation runs alongside cycles (mode 'sync'); mode 'async' "
            "has no cycle to evaluate after: remove one of them"
        )
    for key in ("secure_aggregation", "differential_privacy"):
        if cfg.get(key) is not None:
            raise ConfigError(
                f"server_config.evaluation is not combined with {key}: each worker's "
                "evaluation metrics are sent in the clear and are not accounted for: "
                "remove one of them"
            )
    return {
        "every": out["evaluation.every"],
        "max_workers": out["evaluation.max_workers"],
        "seat_timeout": out["evaluation.seat_timeout"],
    }


def validate_pace_steering(value: Any) -> dict[str, float] | None:
    """``null``/``false`` (off), ``true`` (the default window) or ``{"window": seconds}``."""
    if value is None or value is False:
        return None
    if value is True:
        return {"window": PACE_WINDOW}
    if not isinstance(value, dict) or set(value) - {"window"}:
        raise ConfigError(
            'server_config.pace_steering must be true, false, null or {"window": seconds}'
        )
    key = "pace_steering.window"
    out = {key: value.get("window", PACE_WINDOW)}
    _num(out, key, minimum=1.0, nullable=False, maximum=MAX_CYCLE_LENGTH)
    return {"window": float(out[key])}


def validate_secure_aggregation(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``server_config.secure_aggregation`` normalized (docs/secure-aggregation.md), or
    None; refused with what needs each diff or its own pipeline (per-diff rules, async
    mode, compression). Differential privacy checks its own fit afterwards
    (:func:`gridfl.server.dp_config.validate_differential_privacy`)."""
    if cfg["secure_aggregation"] is None:
        return None
    from dataclasses import asdict

    from gridfl.secagg import SecAggParams
    from gridfl.server import strategies

    if cfg.get("mode") == "async" or cfg.get("compression") is not None:
        raise ConfigError(
            "server_config.secure_aggregation runs in cycles (mode 'sync') and masks its own "
            "quantized diffs: remove mode 'async' or compression"
        )
    if cfg["iterative_plan"] or strategies.strategy_for(cfg.get("strategy")).needs_every_diff:
        raise ConfigError(
            "server_config.secure_aggregation cannot be combined with iterative_plan or a "
            "strategy that needs every diff: the node sees only the sum of the diffs"
        )
    params = SecAggParams.from_config(cfg["secure_aggregation"], max_workers=worker_capacity(cfg))
    return asdict(params)


def worker_capacity(cfg: dict[str, Any]) -> int | None:
    """How many workers one cycle accepts: ceil(max_workers * over_selection), None = no cap."""
    if cfg.get("max_workers") is None:
        return None
    return math.ceil(cfg["max_workers"] * cfg.get("over_selection", 1.0) - 1e-9)


def requires_speed_test(cfg: dict[str, Any]) -> bool:
    return (
        cfg.get("minimum_upload_speed") is not None or cfg.get("minimum_download_speed") is not None
    )
