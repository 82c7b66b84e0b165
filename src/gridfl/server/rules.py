"""The node's decisions as pure functions: no database, no clock, no randomness of their own
(the caller passes the time and a random draw). docs/configs.md states these rules; the
server_config keys are the ones validated by :mod:`gridfl.server.config`.

* :func:`missing_speed_field` and :func:`admit`: whether a cycle request is accepted, or
  why not; :func:`missing_protocol`: a worker that cannot run the process's protocol;
* :func:`full_cycle_reason`: the read-only fast path's rejection of a full cycle;
* :func:`ready` (and :func:`enough_reports`): whether a cycle completes now;
* :func:`cycle_deadline` and :func:`retry_timeout`: a cycle's deadline, and the
  ``timeout`` a rejected worker is told to wait;
* :func:`paced_timeout`: that ``timeout`` with pace steering, spread over the time the
  next cycles can use the workers that check in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gridfl.server.config import requires_speed_test, worker_capacity

__all__ = [
    "ACCEPT",
    "Admission",
    "admit",
    "cycle_deadline",
    "enough_reports",
    "full_cycle_reason",
    "missing_protocol",
    "missing_speed_field",
    "paced_timeout",
    "ready",
    "retry_timeout",
    "worker_capacity",
]

SPEED_FIELDS = ("ping", "download", "upload")


@dataclass(frozen=True)
class Admission:
    """The answer to a cycle request: accepted (``reason`` None), or rejected for
    ``reason``."""

    accepted: bool
    reason: str | None = None

    @classmethod
    def reject(cls, reason: str) -> Admission:
        return cls(False, reason)


ACCEPT = Admission(True)


def missing_speed_field(
    cfg: dict[str, Any], ping: float | None, download: float | None, upload: float | None
) -> str | None:
    """The first speed-test field a request must carry and does not (a minimum speed is
    configured), or ``None``. A missing field is an invalid request, not a rejection."""
    if not requires_speed_test(cfg):
        return None
    values = {"ping": ping, "download": download, "upload": upload}
    return next((key for key in SPEED_FIELDS if values[key] is None), None)


def missing_protocol(cfg: dict[str, Any], protocols: list[str] | None) -> str | None:
    """The rejection reason for a worker that does not run the process's secure
    aggregation (syft.js runs no protocol), else None.

    >>> missing_protocol({"secure_aggregation": {"threshold": 2}}, None)[:40]
    'this FL process runs secure_aggregation,'
    >>> missing_protocol({"secure_aggregation": None}, None) is None
    True
    """
    if cfg.get("secure_aggregation") is None or "secure_aggregation" in (protocols or ()):
        return None
    return (
        "this FL process runs secure_aggregation, which this worker does not implement "
        "(syft.js runs no protocols); train it with the gridfl worker SDK"
    )


def admit(
    cfg: dict[str, Any],
    *,
    sequence: int,
    accepted: int,
    taken: bool,
    download: float | None = None,
    upload: float | None = None,
    last_joined: Callable[[], int | None] = lambda: None,
    draw: Callable[[], float] = lambda: 0.0,
) -> Admission:
    """Whether a worker joins the open cycle number ``sequence``, which has ``accepted``
    seats already (``taken``: one of them is this worker's). In this order:

    * a worker joins a cycle once;
    * ``minimum_download_speed`` / ``minimum_upload_speed`` (Mbit/s): below is rejected;
    * ``do_not_reuse_workers_until_cycle`` = k > 1: a worker that joined cycle s may join
      again from cycle s + k (``last_joined()`` gives s, or None; only asked when k > 1);
    * ``max_workers`` x ``over_selection`` caps the seats (``worker_capacity``);
    * ``pool_selection: random``: accepted with probability free seats / cap, i.e. when
      ``draw()`` (uniform in [0, 1), only drawn under a cap) is below it.

    The defaults of ``last_joined`` and ``draw`` stand for a worker that never joined and
    a draw that always wins.
    """
    if taken:
        return Admission.reject("already accepted into this cycle")
    for key, limit_key, value in (
        ("download", "minimum_download_speed", download),
        ("upload", "minimum_upload_speed", upload),
    ):
        limit = cfg.get(limit_key)
        if limit is not None and value < limit:
            return Admission.reject(
                f"{key} speed {value:g} Mbit/s is below the minimum {limit:g}"
            )
    k = cfg.get("do_not_reuse_workers_until_cycle") or 0
    if k > 1:
        last = last_joined()
        if last is not None and sequence < last + k:
            return Admission.reject(
                f"this worker took part in cycle {last}; it may join again from "
                f"cycle {last + k}"
            )
    cap = worker_capacity(cfg)
    if cap is not None:
        if accepted >= cap:
            return Admission.reject("the cycle is full")
        if cfg.get("pool_selection") == "random" and draw() >= (cap - accepted) / cap:
            return Admission.reject("not selected (random pool selection)")
    return ACCEPT


def full_cycle_reason(cfg: dict[str, Any], *, accepted: int, taken: bool) -> str | None:
    """The rejection a request gets from a cycle whose seats are all taken, decided without
    the cycle's lock, or ``None`` when only :func:`admit` can tell. Accepted counts only grow
    within a cycle, so a committed count at the cap is final; a speed test must still be
    validated (and stored) first."""
    cap = worker_capacity(cfg)
    if cap is None or accepted < cap or requires_speed_test(cfg):
        return None
    return "already accepted into this cycle" if taken else "the cycle is full"


def enough_reports(cfg: dict[str, Any], received: int) -> bool:
    """At least max(1, ``min_diffs``) reports: no cycle completes with fewer."""
    return received >= max(1, cfg.get("min_diffs") or 1)


def ready(
    cfg: dict[str, Any],
    *,
    received: int,
    accepted: Callable[[], int],
    end_at: float | None,
    now: float,
) -> bool:
    """Whether a cycle with ``received`` reports completes at ``now`` (PyGrid's rule, plus:
    a full cycle whose workers all reported is done). With at least max(1, ``min_diffs``)
    reports and ``min_workers`` seats, it completes when ``max_diffs`` reports arrived, or
    its deadline ``end_at`` passed, or it has neither ``max_diffs`` nor a deadline, or the
    cap is reached and every seat reported.

    ``accepted()`` counts the cycle's seats, a scan of them: it is called only when the
    answer depends on it. Every report comes from a seat of its own, so a cycle has at
    least ``received`` seats.

    >>> ready({"max_diffs": 2}, received=2, accepted=lambda: 1 / 0, end_at=None, now=0.0)
    True
    """
    if not enough_reports(cfg, received):
        return False
    seats = functools.cache(accepted)  # counted once at most
    min_workers = cfg.get("min_workers") or 0
    if received < min_workers and seats() < min_workers:
        return False
    max_diffs = cfg.get("max_diffs")
    if max_diffs is not None and received >= max_diffs:
        return True
    if end_at is not None and now >= end_at:
        return True
    if max_diffs is None and end_at is None:
        return True
    cap = worker_capacity(cfg)
    if cap is None or received < cap:  # full and all reported needs received >= seats >= cap
        return False
    return seats() >= cap and received >= seats()


def cycle_deadline(cfg: dict[str, Any], start: float) -> float | None:
    """``start + cycle_length``, or ``None`` (no deadline) when cycle_length is null."""
    length = cfg.get("cycle_length")
    return None if length is None else start + float(length)


def retry_timeout(end_at: float | None, now: float, retry_seconds: int) -> int:
    """The whole seconds a rejected worker waits: to the open cycle's deadline (0 once past
    it), or ``retry_seconds`` when the cycle has no deadline."""
    if end_at is None:
        return retry_seconds
    return max(0, math.ceil(end_at - now))


def paced_timeout(
    wait: float, window: float, arrival_rate: float, needed_rate: float, draw: float
) -> int:
    """Pace steering (Bonawitz et al., SysML 2019, section 2.3): the whole seconds a
    rejected worker waits, so that check-ins come back spread out at about the rate the
    next cycles can admit them, instead of all at the open cycle's deadline.

    ``wait`` is the time until the next cycle opens (:func:`retry_timeout`); ``window``
    how long a cycle selects workers; ``arrival_rate`` the check-ins per second the node
    measures and ``needed_rate`` the admissions per second its cycles can use; ``draw``
    a uniform random number in [0, 1). The next check-in lands uniformly in a horizon
    ``window x arrival_rate / needed_rate`` long (at least ``window``) after ``wait``:
    when ten times more workers check in than a cycle uses, each one comes back about
    ten windows later, and the rate coming back is about the rate needed.

    >>> paced_timeout(wait=30, window=600, arrival_rate=1.0, needed_rate=2.0, draw=0.5)
    330
    >>> paced_timeout(wait=30, window=600, arrival_rate=20.0, needed_rate=2.0, draw=0.5)
    3030
    """
    oversupply = arrival_rate / needed_rate if needed_rate > 0 else 1.0
    horizon = window * max(1.0, oversupply)
    return max(0, math.ceil(wait + draw * horizon))
