"""
Connection speed test against a grid node's ``/model-centric/speed-test`` endpoint.

Run by a job only when the node's authenticate reply says ``requires_speed_test``. It
measures, one after the other (syft.js ran download and upload at the same time, which
skewed both):

* **ping**: round-trip time of small ``GET ...?is_ping=1`` requests, in milliseconds
  (the mean of the samples after the first, which pays for the connection);
* **download**: a streamed ``GET``, in Mbit/s (10^6 bit/s);
* **upload**: a streamed ``POST`` of random bytes, in Mbit/s.

Each phase is bounded in time and bytes (:class:`SpeedTestLimits`), so a slow or huge
endpoint cannot hold a worker for long. Example::

    >>> import asyncio, httpx
    >>> async def main():
    ...     async with httpx.AsyncClient(base_url="http://127.0.0.1:5000") as http:
    ...         return await measure_speed(http, worker_id="...")
    >>> asyncio.run(main())  # doctest: +SKIP
    SpeedTestResult(ping=0.4, download=2150.3, upload=1830.9)
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import httpx

from gridfl._exceptions import ConfigError, GridError, ResponseTimeoutError, TransportError
from gridfl.client import _replies as replies

__all__ = ["SpeedTestLimits", "SpeedTestResult", "measure_speed"]

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class SpeedTestLimits:
    """Bounds of one speed test: seconds per phase, bytes per transfer, ping samples."""

    ping_samples: int = 5
    ping_seconds: float = 2.0
    download_seconds: float = 3.0
    download_bytes: int = 32 * 2**20
    upload_seconds: float = 3.0
    upload_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ConfigError(f"SpeedTestLimits.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class SpeedTestResult:
    """Ping in milliseconds, download and upload in Mbit/s."""

    ping: float
    download: float
    upload: float

    def as_request(self) -> dict[str, float]:
        """The ``{ping, download, upload}`` fields of a cycle request."""
        return {"ping": round(self.ping, 3), "download": round(self.download, 3),
                "upload": round(self.upload, 3)}


def _mbits(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / 1e6 / max(seconds, 1e-6)


def _params(worker_id: str, ping: bool = False) -> dict[str, str]:
    p = {"worker_id": worker_id, "random": f"{random.random():.12f}"}
    if ping:
        p["is_ping"] = "1"
    return p


def _check(resp: httpx.Response, what: str) -> None:
    if not resp.is_success:
        raise replies.node_error(
            f"speed test {what} failed: {resp.status_code} {resp.text[:200]}",
            status=resp.status_code, call=replies.SPEED_TEST,
        )


async def _ping(http: httpx.AsyncClient, path: str, worker_id: str, lim: SpeedTestLimits) -> float:
    samples: list[float] = []
    deadline = time.perf_counter() + lim.ping_seconds
    for _ in range(lim.ping_samples + 1):
        t0 = time.perf_counter()
        resp = await http.get(path, params=_params(worker_id, ping=True))
        samples.append((time.perf_counter() - t0) * 1000)
        _check(resp, "ping")
        if time.perf_counter() > deadline:
            break
    rest = samples[1:] or samples
    return sum(rest) / len(rest)


async def _download(
    http: httpx.AsyncClient, path: str, worker_id: str, lim: SpeedTestLimits
) -> float:
    received = 0
    t0 = time.perf_counter()
    async with http.stream("GET", path, params=_params(worker_id)) as resp:
        _check(resp, "download")
        async for chunk in resp.aiter_raw():
            received += len(chunk)
            if received >= lim.download_bytes or time.perf_counter() - t0 > lim.download_seconds:
                break
    return _mbits(received, time.perf_counter() - t0)


async def _upload(
    http: httpx.AsyncClient, path: str, worker_id: str, lim: SpeedTestLimits
) -> float:
    block = os.urandom(_CHUNK)  # random: a compressing proxy cannot shrink it
    sent = 0
    t0 = time.perf_counter()

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < lim.upload_bytes and time.perf_counter() - t0 < lim.upload_seconds:
            n = min(_CHUNK, lim.upload_bytes - sent)
            yield block[:n]
            sent += n

    resp = await http.post(
        path, params=_params(worker_id), content=body(),
        headers={"content-type": "application/octet-stream"},
    )
    elapsed = time.perf_counter() - t0
    _check(resp, "upload")
    return _mbits(sent, elapsed)


async def measure_speed(
    http: httpx.AsyncClient,
    worker_id: str,
    *,
    limits: SpeedTestLimits | None = None,
    path: str = "/" + replies.SPEED_TEST,
) -> SpeedTestResult:
    """Measure ping, download and upload speed against the node ``http`` points to.

    Raises :class:`~gridfl.TransportError` on network failures and a
    :class:`~gridfl.GridError` subclass when the node answers with an error.
    """
    lim = limits or SpeedTestLimits()
    budget = lim.ping_seconds + lim.download_seconds + lim.upload_seconds + 30
    try:
        async with asyncio.timeout(budget):
            ping = await _ping(http, path, worker_id, lim)
            down = await _download(http, path, worker_id, lim)
            up = await _upload(http, path, worker_id, lim)
    except TimeoutError as exc:
        raise ResponseTimeoutError(f"speed test took longer than {budget:g} s") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"speed test failed: {type(exc).__name__}: {exc}") from exc
    except GridError:
        raise
    return SpeedTestResult(ping=ping, download=down, upload=up)
