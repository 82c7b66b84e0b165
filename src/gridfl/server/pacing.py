"""Pace steering's measurement: how fast workers check in to each hosted process, as this
server process sees it (:func:`gridfl.server.rules.paced_timeout` turns it into the
``timeout`` a rejected worker is told)."""

from __future__ import annotations

import math
import threading

#: the time constant of the check-in rate's exponential average, seconds
RATE_TAU = 60.0


class CheckInRate:
    """Check-ins per second per process, exponentially averaged over ``tau`` seconds.

    Each check-in adds ``1 / tau`` to a rate that decays by ``exp(-dt / tau)``: at a
    steady ``r`` check-ins per second the estimate settles at ``r``. Thread-safe (the
    worker handlers run in threads).

    >>> meter = CheckInRate(tau=10.0)
    >>> rate = 0.0
    >>> for i in range(1000):  # 5 check-ins per second for 200 s
    ...     rate = meter.observe(1, now=i / 5)
    >>> round(rate, 2)  # r (1 + dt / 2 tau) for check-ins dt apart: 1% high here
    5.05
    """

    def __init__(self, tau: float = RATE_TAU) -> None:
        self.tau = tau
        self._rates: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def observe(self, process_id: int, now: float) -> float:
        """Count one check-in at ``now``; returns the rate including it."""
        with self._lock:
            rate, last = self._rates.get(process_id, (0.0, now))
            rate = rate * math.exp(-max(0.0, now - last) / self.tau) + 1.0 / self.tau
            self._rates[process_id] = (rate, max(now, last))
            return rate
