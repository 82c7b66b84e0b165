"""The operations a job flow yields, and the two drivers that perform them.

A flow is a generator that *yields* operations (:class:`Call`, :class:`Fetch`,
:class:`MeasureSpeed`, ...) and receives their results; it never does I/O itself.
:func:`drive_sync` and :func:`drive_async` perform each operation and throw transport
errors back into the generator, so the flow can wrap them (for example into
``ModelLoadFailedError``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gridfl.model import SyftModel

__all__ = [
    "SECURE_AGGREGATION", "SUPPORTED_PROTOCOLS", "Accepted", "BinaryReports", "Call", "Fetch",
    "Flow", "MeasureSpeed", "Operation", "Rejected", "Sleep", "drive_async", "drive_sync",
    "is_awaitable",
]

@dataclass(frozen=True)
class Call:
    """A protocol call (authenticate, cycle-request, report) on the URL's transport.

    ``idempotent`` calls may be retried after the request may have reached the node
    (read timeout, dropped connection); the others only when it surely did not.
    """

    type: str
    data: dict[str, Any]
    idempotent: bool = True
    #: seconds the node may hold the reply on purpose (a long-polled cycle request)
    extra_timeout: float = 0.0


@dataclass(frozen=True)
class Fetch:
    """A download of binary content (model, plan, protocol): ``path`` is the message type,
    ``params`` the query. Over the WebSocket when the node selected ``gridfl.binary.2``
    (one request frame, one binary reply frame), else an HTTP GET of ``/<path>?<params>``."""

    path: str
    params: dict[str, Any]


@dataclass(frozen=True)
class MeasureSpeed:
    """Run the speed test; the result is a dict ``{ping, download, upload}``."""

    worker_id: str


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` (a flow polling the node, such as secure aggregation's stages)."""

    seconds: float


@dataclass(frozen=True)
class BinaryReports:
    """Whether a report would go as a binary frame (a WebSocket on which the node
    selected ``gridfl.binary.2``): the only way a compressed report travels. A bool."""


Operation = Call | Fetch | MeasureSpeed | Sleep | BinaryReports


@dataclass(frozen=True)
class Accepted:
    model: SyftModel
    client_config: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    timeout: int | None


Flow = Generator[Operation, Any, Any]

#: the protocol this SDK runs (gridfl.secagg.NAME), named in every cycle request so that
#: a node hosting it accepts this worker
SECURE_AGGREGATION = "secure_aggregation"
SUPPORTED_PROTOCOLS = (SECURE_AGGREGATION,)


def drive_sync(flow: Flow, perform: Callable[[Operation], Any]) -> Any:
    """Run a flow to completion, performing each operation with a blocking ``perform``."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = perform(op), None
        except Exception as exc:  # noqa: BLE001 - handed back to the flow, which decides
            value, error = None, exc


async def drive_async(flow: Flow, perform: Callable[[Operation], Awaitable[Any]]) -> Any:
    """Run a flow to completion, awaiting each operation."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = await perform(op), None
        except Exception as exc:  # noqa: BLE001 - handed back to the flow, which decides
            value, error = None, exc


def is_awaitable(value: Any) -> bool:
    return inspect.isawaitable(value)
