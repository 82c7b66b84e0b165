"""
Network transports of the worker SDK (asyncio; the sync shell runs them on its own loop).

* :class:`HttpTransport`: one ``httpx.AsyncClient`` per client (connection reuse) for the
  JSON calls over HTTP, the binary downloads and the speed test.
* :class:`WsTransport`: one WebSocket per client, shared by all its jobs; requests carry
  a random ``request_id`` and replies are matched by it; every request has a timeout;
  a dropped socket fails the requests in flight and the next request reconnects. When the
  node selects gridfl's ``gridfl.binary.2`` subprotocol at the handshake (gridfl nodes
  do), reports go as binary frames (JSON header + raw diff bytes), skipping base64 and a
  1 MB JSON string on both ends, and the downloads (model, plans, protocols) go over the
  socket: one JSON request frame, one binary reply frame, instead of an HTTP GET each.
  Otherwise (PyGrid) reports are JSON text frames and downloads HTTP GETs.

A report's ``diff`` (or a masked input's ``vector``) arrives from the job flow as bytes;
:func:`json_data` base64-encodes it for the JSON paths.

Both retry transient failures a bounded number of times with exponential back-off.
Calls that are not idempotent (cycle-request, report) are retried only when the request
surely did not reach the node (connect failed, socket already closed before sending).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.typing import Subprotocol

from gridfl import _messages
from gridfl._exceptions import (
    GridError,
    PayloadTooLargeError,
    ResponseTimeoutError,
    TransportError,
)
from gridfl.client import _replies as replies

logger = logging.getLogger("gridfl.client")

T = TypeVar("T")

#: Largest message accepted from the node over the WebSocket: JSON replies are small, a
#: download's binary frame carries a whole model or plan. 64 MiB is the node's default body
#: limit (the largest report it takes); a download that would not fit is refused by the
#: node (the request says ``max_bytes``) and fetched over HTTP instead.
WS_MAX_MESSAGE = 64 * 2**20
#: room for a binary reply's length prefix and JSON header (type, request_id)
_REPLY_HEADER_ROOM = 4 + 4096


class _BinaryReply:
    """A binary frame from the node: a download's bytes, with its JSON header."""

    __slots__ = ("header", "payload")

    def __init__(self, header: dict[str, Any], payload: bytes) -> None:
        self.header = header
        self.payload = payload


def json_data(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` for a JSON message: its bytes (a report's ``diff``, a masked input's
    ``vector``: :data:`gridfl._messages.BINARY_PAYLOADS`) as base64 text."""
    payload = _messages.binary_payload(type_, data)
    if payload is None:
        return data
    return _messages.with_payload(type_, data, _messages.b64encode(payload))


class _NotSent(Exception):
    """Internal: the request surely never reached the node, so any call may be retried."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 2.0) -> float:
    """Delay before retry number ``attempt`` (0-based): 0.2, 0.4, 0.8, ... capped."""
    return min(cap, base * (2**attempt))


async def with_retries(
    what: str,
    attempt_fn: Callable[[], Awaitable[T]],
    *,
    retries: int,
    idempotent: bool,
) -> T:
    """Run ``attempt_fn`` with up to ``retries`` retries of transient failures."""
    attempt = 0
    while True:
        try:
            return await attempt_fn()
        except _NotSent as exc:
            error: BaseException = exc.cause
            retry = True
        except GridError as exc:
            error = exc
            retry = exc.retryable and idempotent
        if not retry or attempt >= retries:
            if isinstance(error, GridError):
                raise error
            raise TransportError(f"{what}: {error}") from error
        delay = backoff_delay(attempt)
        logger.info("%s failed (%s); retry %d/%d in %.1fs", what, error, attempt + 1, retries,
                    delay)
        attempt += 1
        await asyncio.sleep(delay)


def _http_error(exc: httpx.HTTPError, what: str) -> TransportError:
    if isinstance(exc, httpx.TimeoutException):
        err: TransportError = ResponseTimeoutError(f"{what}: no reply in time ({exc!r})")
    else:
        err = TransportError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _verify(base_url: str) -> bool:
    """httpx's ``verify`` for a client of ``base_url``.

    httpx builds its default SSL context when the client is created, loading the whole CA
    bundle: ~90 ms of CPU in every worker process, even for a plain ``http://`` node that
    never speaks TLS. For ``http://`` base URLs (every request is a relative path, redirects
    are off, so nothing ever goes to an ``https://`` URL) ``verify=False`` skips that and
    changes nothing. ``https://`` keeps full verification, and so does ``http://`` when an
    ``https://`` proxy is configured in the environment (the proxy hop would be TLS).
    """
    if not base_url.lower().startswith("http://"):
        return True
    return any(
        key.lower().endswith("_proxy") and value.strip().lower().startswith("https:")
        for key, value in os.environ.items()
    )


class HttpTransport:
    """JSON calls and binary downloads over one pooled ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        retries: int,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.retries = retries
        self.client = client or httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            headers=headers,
            follow_redirects=False,
            verify=_verify(base_url),  # unused by a given transport: it connects itself
            transport=transport,
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        what = f"{method} {path}"
        try:
            return await self.client.request(method, "/" + path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _NotSent(_http_error(exc, what)) from exc
        except httpx.HTTPError as exc:
            raise _http_error(exc, what) from exc

    async def call(
        self, type_: str, data: dict[str, Any], *, idempotent: bool = True, extra_timeout: float = 0
    ) -> dict:
        """POST a protocol message; return the reply's ``data`` or raise the node's error."""
        kwargs: dict[str, Any] = {"json": json_data(type_, data)}
        if extra_timeout:
            kwargs["timeout"] = httpx.Timeout(self.timeout + extra_timeout)

        async def attempt() -> dict:
            resp = await self._request("POST", type_, **kwargs)
            return self._parse_json(resp, type_)

        return await with_retries(type_, attempt, retries=self.retries, idempotent=idempotent)

    async def fetch(self, path: str, params: dict[str, Any]) -> bytes:
        """GET binary content (model, plan, protocol); raise the node's error on non-2xx."""

        async def attempt() -> bytes:
            resp = await self._request("GET", path, params=params)
            if resp.is_success:
                return resp.content
            raise self._error(resp, path)

        return await with_retries(path, attempt, retries=self.retries, idempotent=True)

    def _parse_json(self, resp: httpx.Response, call: str) -> dict:
        if not resp.is_success:
            raise self._error(resp, call)
        try:
            body = resp.json()
        except ValueError as exc:
            raise GridError(f"malformed reply to {call}: not JSON ({resp.text[:200]!r})") from exc
        return replies.unwrap_reply(body, call=call, status=resp.status_code)

    @staticmethod
    def _error(resp: httpx.Response, call: str) -> GridError:
        message: Any = None
        try:
            body = resp.json()
            if isinstance(body, dict):
                message = body.get("error")
                if message is None and isinstance(body.get("data"), dict):
                    message = body["data"].get("error")
        except ValueError:
            pass
        if message is None:
            message = f"{resp.status_code} {resp.reason_phrase}".strip()
        return replies.node_error(message, status=resp.status_code, call=call)

    async def aclose(self) -> None:
        await self.client.aclose()


class WsTransport:
    """One WebSocket to the node, shared by every job of a client.

    Requests are ``{"type", "request_id", "data"}``; a reading task resolves the waiting
    request by ``request_id`` (a reply without one is matched to the oldest pending
    request of the same ``type``, as old PyGrid servers reply).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retries: int,
        headers: dict[str, str] | None = None,
        max_message: int = WS_MAX_MESSAGE,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.headers = headers
        self.max_message = max_message
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        # request_id -> (future, connection it was sent on, message type)
        self._pending: dict[str, tuple[asyncio.Future[Any], ClientConnection, str]] = {}
        self._closed = False
        self.connects = 0  # how many sockets were opened (visible to tests)
        # downloads the node refused as larger than max_message (413): what they fetch
        # (path and ids, not the per-cycle keys) keeps its size, so they go over HTTP
        # while this socket lasts instead of being asked for over it again every cycle.
        # A new socket forgets them: it may reach a node restarted with other limits.
        self._too_large: set[tuple] = set()

    async def _connection(self) -> ClientConnection:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise TransportError("the client is closed")
            conn = self._conn
            if conn is not None and conn.state.name == "OPEN":
                return conn
            try:
                conn = await connect(
                    self.url,
                    open_timeout=self.timeout,
                    close_timeout=2,
                    max_size=self.max_message,
                    # Diffs are base64 floats: deflate saves ~25% of the bytes for several
                    # times the CPU of the whole exchange, on both ends.
                    compression=None,
                    subprotocols=[Subprotocol(_messages.BINARY_SUBPROTOCOL)],
                    additional_headers=self.headers,
                    proxy=None,
                )
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                err = TransportError(f"cannot open WebSocket {self.url}: {exc!r}")
                err.__cause__ = exc
                raise _NotSent(err) from exc
            self.connects += 1
            logger.debug("WebSocket open: %s", self.url)
            self._conn = conn
            self._too_large.clear()
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return conn

    async def _read(self, conn: ClientConnection) -> None:
        reason: BaseException | None = None
        try:
            async for raw in conn:
                self._dispatch(raw, conn)
        except ConnectionClosed as exc:
            reason = exc
        except Exception as exc:  # pragma: no cover - defensive: never lose waiters
            reason = exc
            logger.exception("WebSocket reader crashed")
        finally:
            if self._conn is conn:
                self._conn = None
            why = f"WebSocket connection closed ({reason or 'closed by the node'})"
            for rid, (fut, sent_on, _) in list(self._pending.items()):
                if sent_on is conn and not fut.done():
                    fut.set_exception(TransportError(why))
                    self._pending.pop(rid, None)

    def _dispatch(self, raw: str | bytes, conn: ClientConnection) -> None:
        reply: dict[str, Any] | _BinaryReply
        try:
            if isinstance(raw, str):
                msg = json.loads(raw)
            else:  # a download's reply: length, JSON header {type, request_id}, bytes
                head, payload = _messages.split_binary_frame(raw)
                msg = json.loads(head.decode("utf-8"))
        except (ValueError, GridError):  # bad JSON, bad UTF-8, broken framing
            logger.warning("ignoring a malformed WebSocket message: %.200r", raw)
            return
        if not isinstance(msg, dict):
            logger.warning("ignoring a WebSocket message that is not an object: %.200r", msg)
            return
        reply = msg if isinstance(raw, str) else _BinaryReply(msg, payload)
        rid = msg.get("request_id")
        entry = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if entry is None and rid is None:
            mtype = msg.get("type")
            for key, (_, sent_on, t) in self._pending.items():
                if sent_on is conn and t == mtype:
                    entry = self._pending.pop(key)
                    break
        if entry is None:
            logger.debug("ignoring an unmatched WebSocket reply: %.200r", msg)
            return
        fut = entry[0]
        if not fut.done():
            fut.set_result(reply)

    async def _exchange(
        self, conn: ClientConnection, type_: str, data: dict[str, Any], timeout: float
    ) -> dict[str, Any] | _BinaryReply:
        """Send one request on ``conn`` and wait (at most ``timeout`` s) for its reply."""
        rid = secrets.token_urlsafe(24)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, conn, type_)
        try:
            frame: str | bytes
            if self._binary_report(conn, type_, data):
                frame = _messages.encode_binary_report(data, rid, type_)
            else:
                body = {"type": type_, "request_id": rid, "data": json_data(type_, data)}
                frame = json.dumps(body)
            try:
                await conn.send(frame)
            except ConnectionClosed as exc:
                if self._conn is conn:
                    self._conn = None
                err = TransportError(f"{type_}: WebSocket closed before sending ({exc})")
                raise _NotSent(err) from exc
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError as exc:
                raise ResponseTimeoutError(
                    f"{type_}: no reply within {timeout:g} s (Response timeout)"
                ) from exc
        finally:
            self._pending.pop(rid, None)

    async def call(
        self, type_: str, data: dict[str, Any], *, idempotent: bool = True, extra_timeout: float = 0
    ) -> dict:
        """Send one request and wait (at most ``timeout`` s) for the reply's ``data``."""
        timeout = self.timeout + extra_timeout

        async def attempt() -> dict:
            msg = await self._exchange(await self._connection(), type_, data, timeout)
            if isinstance(msg, _BinaryReply):
                raise GridError(f"malformed reply to {type_}: a binary frame")
            return replies.unwrap_reply(msg, call=type_)

        return await with_retries(type_, attempt, retries=self.retries, idempotent=idempotent)

    async def fetch(self, path: str, params: dict[str, Any]) -> bytes | None:
        """Download a model, plan or protocol over the socket (request ``path`` as the
        message type, the GET's query as ``data``; the reply is one binary frame), or None
        when it should go over HTTP: the node did not select ``gridfl.binary.2`` (PyGrid),
        the download is larger than :attr:`max_message` (the node answers 413, and the
        same download goes over HTTP while this socket lasts), or it did not arrive within the
        timeout (over the socket the timeout covers the whole transfer; over HTTP it
        applies to each read)."""
        what = (path, *sorted((k, str(v)) for k, v in params.items()
                              if k not in ("worker_id", "request_key")))

        async def attempt() -> bytes | None:
            conn = await self._connection()  # a new socket forgets what was too large
            if conn.subprotocol != _messages.BINARY_SUBPROTOCOL or what in self._too_large:
                return None
            data = {**params, "max_bytes": self.max_message - _REPLY_HEADER_ROOM}
            try:
                msg = await self._exchange(conn, path, data, self.timeout)
            except ResponseTimeoutError as exc:
                logger.info("%s over the WebSocket: %s; downloading over HTTP", path, exc)
                return None
            if isinstance(msg, _BinaryReply):
                return msg.payload
            try:
                replies.unwrap_reply(msg, call=path)
            except PayloadTooLargeError as exc:
                logger.info("%s over the WebSocket: %s; over HTTP from now on", path, exc)
                self._too_large.add(what)
                return None
            raise GridError(f"malformed reply to {path}: JSON without an error, no bytes")

        return await with_retries(path, attempt, retries=self.retries, idempotent=True)

    async def binary_reports(self) -> bool:
        """Whether the node selected ``gridfl.binary.2`` (opening the socket if need be)."""
        return (await self._connection()).subprotocol == _messages.BINARY_SUBPROTOCOL

    @staticmethod
    def _binary_report(conn: ClientConnection, type_: str, data: dict[str, Any]) -> bool:
        """Send this message as a binary frame: a report with bytes or a masked input,
        to a node that selected ``gridfl.binary.2`` at the handshake. A compressed report
        cannot go otherwise (the socket was reopened to a node that no longer selects
        it)."""
        binary = (
            conn.subprotocol == _messages.BINARY_SUBPROTOCOL
            and _messages.binary_payload(type_, data) is not None
        )
        if not binary and data.get("compression") is not None:
            raise GridError(
                f"{type_}: a compressed report needs the {_messages.BINARY_SUBPROTOCOL!r} "
                "subprotocol, which the node no longer selected"
            )
        return binary

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.state.name == "OPEN"

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 3)


class Network:
    """The I/O side of a client: performs the operations the job flows yield."""

    def __init__(
        self,
        *,
        transport: str,
        ws_url: str,
        http_url: str,
        timeout: float,
        retries: int,
        headers: dict[str, str] | None = None,
        speed_test: Any = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = HttpTransport(
            http_url, timeout=timeout, retries=retries, headers=headers, transport=http_transport
        )
        self.ws = (
            WsTransport(ws_url, timeout=timeout, retries=retries, headers=headers)
            if transport == "ws"
            else None
        )
        self.speed_test = speed_test

    async def perform(self, op: Any) -> Any:
        from gridfl.client._flow import BinaryReports, Call, Fetch, MeasureSpeed, Sleep
        from gridfl.client.speedtest import measure_speed

        if isinstance(op, Call):
            primary = self.ws if self.ws is not None else self.http
            return await primary.call(
                op.type, op.data, idempotent=op.idempotent, extra_timeout=op.extra_timeout
            )
        if isinstance(op, Fetch):
            if self.ws is not None:
                data = await self.ws.fetch(op.path, op.params)
                if data is not None:
                    return data
            return await self.http.fetch(op.path, op.params)
        if isinstance(op, BinaryReports):
            return self.ws is not None and await self.ws.binary_reports()
        if isinstance(op, MeasureSpeed):
            result = await measure_speed(self.http.client, op.worker_id, limits=self.speed_test)
            return result.as_request()
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.aclose()
        await self.http.aclose()
