"""``server_config.secure_aggregation``: its keys, defaults, validation and descriptor.

>>> p = SecAggParams.from_config({"threshold": 3, "neighbours": 4}, max_workers=10)
>>> p.threshold, p.degree(10), p.degree(3)
(3, 4, 2)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from gridfl._exceptions import ConfigError

#: the protocol's name: the key in ``job.protocols`` and the process's protocol row
NAME = "secure_aggregation"
#: version of the stage messages; a worker refuses a descriptor of another version
VERSION = 1

#: most shares one worker makes: its unmask answer must fit a worker message (at most
#: 4,096 JSON values; each share is three)
MAX_SHARES = 1000

#: key -> default (None for ``threshold``: it has no default)
DEFAULTS: dict[str, Any] = {
    "threshold": None,
    "neighbours": None,
    "clipping_range": 1.0,
    "quantization_bits": 16,
    "field_bits": 64,
    "max_num_samples": 65536,
    "stage_timeout": 60.0,
    "min_survivors": None,
}


@dataclass(frozen=True)
class SecAggParams:
    """The validated parameters of a secure-aggregation process.

    ``neighbours`` None is plain SecAgg (every worker shares with every other); an integer
    k is SecAgg+, rounded up to even (k/2 ring neighbours on each side).
    """

    threshold: int
    neighbours: int | None
    clipping_range: float
    quantization_bits: int
    field_bits: int
    max_num_samples: int
    stage_timeout: float
    min_survivors: int

    @property
    def scale(self) -> float:
        """Quantization steps per unit: a clipped value x becomes round(x * scale)."""
        return ((1 << (self.quantization_bits - 1)) - 1) / self.clipping_range

    def degree(self, n: int) -> int:
        """Neighbours of each worker in a cycle of ``n`` workers (self excluded)."""
        if self.neighbours is None:
            return n - 1
        return min(2 * math.ceil(self.neighbours / 2), n - 1)

    def descriptor(self) -> dict[str, Any]:
        """What ``get-protocol`` serves, so a worker knows what to run."""
        return {"name": NAME, "version": VERSION, **asdict(self)}

    def descriptor_bytes(self) -> bytes:
        return json.dumps(self.descriptor(), sort_keys=True).encode()

    @classmethod
    def from_descriptor(cls, raw: bytes | dict) -> SecAggParams:
        """The parameters a worker downloaded (``job.protocols[NAME]``)."""
        d = json.loads(raw) if isinstance(raw, (bytes, str)) else dict(raw)
        if d.get("name") != NAME or d.get("version") != VERSION:
            raise ConfigError(
                f"protocol descriptor is {d.get('name')!r} v{d.get('version')}; this worker "
                f"runs {NAME!r} v{VERSION}"
            )
        return cls(**{k: d[k] for k in DEFAULTS})

    @classmethod
    def from_config(cls, cfg: Any, *, max_workers: int | None) -> SecAggParams:
        """Validate ``server_config.secure_aggregation`` against the cycle's worker cap."""
        where = "server_config.secure_aggregation"
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where} must be an object (or null to turn it off)")
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        v = {**DEFAULTS, **cfg}
        if max_workers is None:
            raise ConfigError(
                f"{where} needs server_config.max_workers: the field must hold the sum of every "
                "worker's input, so the number of workers in a cycle must be bounded"
            )
        _int(v, "threshold", 2, max_workers, where)
        if v["neighbours"] is not None:
            _int(v, "neighbours", 2, 1 << 16, where)
        _int(v, "quantization_bits", 2, 48, where)
        _int(v, "field_bits", 16, 64, where)
        _int(v, "max_num_samples", 1, 1 << 53, where)
        for key in ("clipping_range", "stage_timeout"):
            x = v[key]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1e9:
                raise ConfigError(f"{where}.{key} must be a number > 0; got {x!r}")
            v[key] = float(x)
        if v["min_survivors"] is None:
            v["min_survivors"] = v["threshold"]
        _int(v, "min_survivors", v["threshold"], max_workers, where)
        p = cls(**v)
        shares = (p.degree(max_workers) + 1) if p.neighbours is not None else max_workers
        if shares > MAX_SHARES:
            raise ConfigError(
                f"{where}: each worker would make {shares} shares, more than {MAX_SHARES}; "
                "set neighbours (SecAgg+, e.g. 2 log2 of max_workers) or lower max_workers"
            )
        if p.threshold > shares:
            raise ConfigError(
                f"{where}.threshold {p.threshold} is more than the {shares} shares each worker "
                "makes (itself and its neighbours); lower it or raise neighbours"
            )
        if 2 * p.threshold <= shares:
            raise ConfigError(
                f"{where}.threshold must be more than half of the {shares} shares each worker "
                f"makes (at least {shares // 2 + 1}): with half or fewer, a node that tells two "
                "groups different dropout stories could collect both secrets of one worker"
            )
        top = max_workers * p.max_num_samples
        if top * ((1 << (p.quantization_bits - 1)) - 1) >= 1 << (p.field_bits - 1):
            raise ConfigError(
                f"{where}: {max_workers} workers x max_num_samples {p.max_num_samples} x "
                f"2^{p.quantization_bits - 1} overflows a field of {p.field_bits} bits; raise "
                "field_bits or lower quantization_bits, max_num_samples or max_workers"
            )
        return p


def _int(v: dict, key: str, lo: int, hi: int, where: str) -> None:
    x = v[key]
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise ConfigError(f"{where}.{key} must be an integer in {lo}..{hi}; got {x!r}")
