"""User-level differential privacy, the parts shared by node and worker: clipping, Gaussian
noise, the adaptive clip norm and the privacy accountant (pure numpy, no I/O).

DP-FedAvg (McMahan et al., ICLR 2018): each report's diff, all tensors together, is clipped
to L2 norm ``C``; the clipped diffs are summed, Gaussian noise of standard deviation ``z*C``
is added to the sum, and the sum is divided by the fixed expected count ``m``. In
*distributed* mode each worker adds its share, ``N(0, z^2 C^2 / m)``, so that the sum of
``m`` reports carries the same noise. docs/privacy.md has the formulas and the trust model.

    >>> import numpy as np
    >>> clipped, norm = clip([np.array([30.0, 0.0]), np.array([40.0])], 5.0)
    >>> float(norm), [a.tolist() for a in clipped]
    (50.0, [[3.0, 0.0], [4.0]])

The accountant (:func:`epsilon`) needs Google's ``dp-accounting`` (the ``server`` extra); a
worker never imports it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "adaptive_clip_update",
    "clip",
    "epsilon",
    "l2_norm",
    "noise_split",
    "privatize",
    "privatize_report",
    "secure_rng",
]

#: the accountants :func:`epsilon` offers: Renyi DP (fast, a little loose) and privacy loss
#: distributions (tighter, about 0.7 s per call)
ACCOUNTANTS = ("rdp", "pld")
#: the PLD accountant's distributions grow with epsilon and 1/z (76 GiB at z = 0.001,
#: 5 GB and a minute at z = 0.1): it takes z >= PLD_MIN_NOISE, and beyond an RDP epsilon
#: of PLD_MAX_EPSILON (a guarantee of no practical worth) the RDP value, a valid upper
#: bound, is returned instead
PLD_MIN_NOISE = 0.5
PLD_MAX_EPSILON = 64.0


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the OS's CSPRNG (:mod:`secrets`), so no
    one can replay the noise from a guessable seed.

        >>> secure_rng().normal(size=2).shape
        (2,)
    """
    return np.random.default_rng(secrets.randbits(128))


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of all tensors taken together (flat clipping), in float64.

    >>> l2_norm([np.array([3.0]), np.array([[4.0]])])
    5.0
    """
    total = math.fsum(float(np.dot(v, v)) for v in (_flat64(a) for a in arrays))
    return math.sqrt(total)


def _flat64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


def clip(arrays: Sequence[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], float]:
    """``(arrays * min(1, C / norm), norm)``: the diff scaled into the L2 ball of radius
    ``clip_norm`` (float64 copies), and its norm before clipping."""
    norm = l2_norm(arrays)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return [np.asarray(a, dtype=np.float64) * scale for a in arrays], norm


def privatize(
    arrays: Sequence[np.ndarray],
    clip_norm: float,
    noise_std: float,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """A worker's report in distributed mode: the diff clipped to ``clip_norm``, plus
    ``N(0, noise_std^2)`` on every value, cast back to each tensor's dtype.

        >>> out = privatize([np.ones(4, dtype=np.float32)], 1.0, 0.0)
        >>> out[0].dtype.name, round(float(np.linalg.norm(out[0])), 6)
        ('float32', 1.0)
    """
    rng = rng or secure_rng()
    clipped, _ = clip(arrays, clip_norm)
    out = []
    for a, c in zip(arrays, clipped, strict=True):
        noisy = c + rng.normal(0.0, noise_std, size=c.shape) if noise_std > 0 else c
        dtype = np.asarray(a).dtype
        out.append(np.rint(noisy).astype(dtype) if dtype.kind in "iub" else noisy.astype(dtype))
    return out


def privatize_report(diff: bytes, client_config: dict, rng=None) -> bytes:
    """The serialized diff a worker reports: as is, or, when the cycle's ``client_config``
    carries the node's distributed-mode ``differential_privacy`` settings, clipped and
    noised (:func:`privatize`) before it leaves the worker.

        >>> from gridfl.state import dumps, loads
        >>> cfg = {"differential_privacy": {"mode": "distributed", "clip_norm": 1.0,
        ...                                 "noise_stddev": 0.0}}
        >>> loads(privatize_report(dumps([np.array([6.0, 8.0])]), cfg))[0].round(6).tolist()
        [0.6, 0.8]
    """
    settings = client_config.get("differential_privacy")
    if settings is None:
        return diff
    from gridfl._exceptions import ConfigError
    from gridfl.state import dumps, loads

    ok = isinstance(settings, dict) and settings.get("mode") == "distributed"
    c: Any = settings.get("clip_norm") if ok else None
    std: Any = settings.get("noise_stddev") if ok else None
    if not (_positive(c) and (_positive(std) or std == 0)):
        raise ConfigError(
            "client_config.differential_privacy from the node is not valid: expected mode "
            f"'distributed', clip_norm > 0 and noise_stddev >= 0; got {settings!r}"[:300]
        )
    return dumps(privatize(loads(bytes(diff)), c, std, rng))


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def noise_split(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier ``z_delta`` when adaptive clipping also releases a
    noised count (Andrew et al. 2021, Theorem 1): the update (multiplier ``z_delta``) and
    the count of ``b - 1/2`` bits (sensitivity 1/2, noise ``count_stddev``) compose to one
    Gaussian mechanism of multiplier ``z``:
    ``z_delta = (z^-2 - (2 count_stddev)^-2)^(-1/2)``. Needs ``z < 2 count_stddev``.

        >>> round(noise_split(1.0, 5.0), 4)
        1.005
    """
    z, s = noise_multiplier, count_stddev
    if z == 0:
        return 0.0
    if not 2 * s > z:
        raise ValueError(f"count noise {s:g} must be more than z/2 = {z / 2:g}")
    return (z**-2 - (2 * s) ** -2) ** -0.5


def adaptive_clip_update(
    clip_norm: float,
    unclipped: int,
    reports: int,
    expected: float,
    target_quantile: float,
    learning_rate: float,
    count_stddev: float,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Andrew et al.'s geometric update of the clip norm; returns ``(new C, noised
    fraction)``. Of ``reports`` reports, ``unclipped`` had a norm at most ``clip_norm``
    (bit 1); the noised fraction ``b = (sum(bit - 1/2) + N(0, count_stddev^2)) / expected +
    1/2`` (TF Privacy's centred bits: sensitivity 1/2, the fixed denominator ``expected``)
    is clamped to [0, 1], and ``C <- C * exp(-lr * (b - target))``: C grows while fewer
    than ``target`` of the reports fit under it, and shrinks while more do.

        >>> c, b = adaptive_clip_update(0.1, 10, 10, 10, 0.5, 0.2, 0.0)
        >>> b, round(c, 6)  # every report fit under C: C shrinks toward the quantile
        (1.0, 0.090484)
        >>> round(adaptive_clip_update(0.1, 0, 10, 10, 0.5, 0.2, 0.0)[0], 6)  # none did
        0.110517
    """
    rng = rng or secure_rng()
    noise = rng.normal(0.0, count_stddev) if count_stddev > 0 else 0.0
    centred = unclipped - reports / 2
    fraction = min(1.0, max(0.0, (centred + noise) / expected + 0.5))
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile)), fraction


def epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε(δ) after ``steps`` cycles of the Poisson-sampled Gaussian mechanism (sampling rate
    ``q``, noise multiplier ``z``), with Google's ``dp-accounting``; ``math.inf`` when
    ``z`` is 0, 0 before any step. ``accountant="pld"`` needs ``z >= PLD_MIN_NOISE`` and
    answers with RDP's ε when that is above ``PLD_MAX_EPSILON``.

        >>> round(epsilon(0.1, 1.0, 100, 1e-5), 3)
        7.904
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "pld":
        if noise_multiplier < PLD_MIN_NOISE:
            raise ValueError(f"the PLD accountant needs z >= {PLD_MIN_NOISE}")
        rdp = epsilon(sampling_rate, noise_multiplier, steps, delta)
        if rdp > PLD_MAX_EPSILON:
            return rdp
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )
    acct = (
        dp_accounting.pld.PLDAccountant()
        if accountant == "pld"
        else dp_accounting.rdp.RdpAccountant()
    )
    absl = logging.getLogger("absl")
    level = absl.level
    # the RDP orders near 1 do not converge for some (q, z) and are dropped with a warning
    # per order and per call: the result is unaffected
    absl.setLevel(logging.ERROR)
    try:
        acct.compose(event)
        return float(acct.get_epsilon(delta))
    finally:
        absl.setLevel(level)
