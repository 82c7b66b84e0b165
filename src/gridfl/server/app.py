"""The ASGI app: WebSocket at ``/``, worker HTTP under ``/model-centric/``, admin under
``/gridfl/v1/``. Routes and the socket stay thin: decode, call one handler, encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import gridfl
from gridfl import _wire
from gridfl._exceptions import (
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnavailableError,
)
from gridfl.server.auth import check_admin
from gridfl.server.config import MAX_INT
from gridfl.server.errors import to_status
from gridfl.server.service import CYCLE_CHANNEL, GridNode
from gridfl.server.settings import Settings

log = logging.getLogger("gridfl.server")

# --- the worker handlers, written once, called by both transports ---------------------------
HANDLERS: dict[str, Callable[[GridNode, Any], dict[str, Any]]] = {
    _wire.AUTHENTICATE: lambda node, data: node.authenticate(_wire.parse_authenticate(data)),
    _wire.CYCLE_REQUEST: lambda node, data: node.cycle_request(_wire.parse_cycle_request(data)),
    _wire.REPORT: lambda node, data: node.report(_wire.parse_report(data)),
}


#: the downloads, written once for both transports: (GridNode method, id parameter, whether
#: ``receive_operations_as`` picks a variant); HTTP ``GET /<type>?...``, and on a socket
#: that negotiated the gridfl.binary.2 subprotocol a request frame ``{"type", "data"}``
ASSETS: dict[str, tuple[str, str, bool]] = {
    _wire.GET_MODEL: ("get_model", "model_id", False),
    _wire.GET_PLAN: ("get_plan", "plan_id", True),
    _wire.GET_PROTOCOL: ("get_protocol", "protocol_id", False),
}


async def fetch_asset(app, kind: str, query: Any) -> bytes:
    """Validate a download request (query parameters or a WS frame's ``data``) and read the
    bytes off the event loop."""
    method, id_key, variant = ASSETS[kind]
    req = _wire.parse_asset_request(query, id_key, variant=variant)
    return await anyio.to_thread.run_sync(getattr(app.state.node, method), req)


def _error_extra(kind: str | None) -> dict[str, Any]:
    # PyGrid answers a failed cycle-request with a rejection that carries the error
    return {"status": "rejected"} if kind == _wire.CYCLE_REQUEST else {}


def _parse_json(body: bytes | str, what: str = "the body", *, check: bool = True) -> Any:
    """A worker message's JSON (:func:`_wire.parse_json`, its values capped)."""
    return _wire.parse_json(body, what, max_values=_wire.MAX_MESSAGE_VALUES, check=check)


class CycleSignal:
    """Wakes held requests (cycle requests, status) when a cycle opens or closes or a
    process stops running.

    ``notify`` runs on the event loop (the node calls it from worker threads through
    ``call_soon_threadsafe``); waiters compare generations, so a wake-up between their
    check and their wait is never lost.
    """

    def __init__(self) -> None:
        self.generation = 0
        #: the server is shutting down: nothing waits any more
        self.closed = False
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self.notify()

    async def wait_after(self, generation: int, timeout: float) -> None:
        if self.closed or self.generation != generation:
            return
        with anyio.move_on_after(timeout):
            await self._event.wait()


class HeldAdmissions:
    """Answers the cycle requests held by :func:`dispatch` in batches: when a cycle opens,
    every worker waiting for it asks at once, and one thread call admits up to
    ``batch`` of them in one write transaction (:meth:`GridNode.admit_held`) instead of a
    thread hand-off, a read-only look and a write transaction each.
    """

    def __init__(self, node: GridNode, batch: int = 64) -> None:
        self.node = node
        self.batch = batch
        self._queue: list[tuple[_wire.CycleRequest, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def admit(self, req: _wire.CycleRequest) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((req, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            # the waiters one signal woke resume over the next loop turns: let them queue
            for _ in range(3):
                await asyncio.sleep(0)
            while self._queue:
                batch, self._queue = self._queue[: self.batch], self._queue[self.batch :]
                reqs = [req for req, _ in batch]
                try:
                    results = await anyio.to_thread.run_sync(self.node.admit_held, reqs)
                except Exception as e:  # noqa: BLE001 - the transaction failed: all of them
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its connection went away meanwhile
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drainer = None


async def dispatch(app, kind: str, data: Any) -> dict[str, Any]:
    """Run one worker handler off the event loop; a cycle request with ``wait`` is held
    while it would be rejected with a timeout, until a cycle opens or ``wait`` runs out."""
    node: GridNode = app.state.node
    if kind != _wire.CYCLE_REQUEST:
        return await anyio.to_thread.run_sync(HANDLERS[kind], node, data)
    req = _wire.parse_cycle_request(data)
    signal: CycleSignal = app.state.cycle_signal
    # The signal fires when a cycle opens or closes in this process, and when another
    # server process on the same database opens one (PostgreSQL: _cycle_listener, at once;
    # otherwise _cycle_watcher, within long_poll_recheck seconds): waiters do not poll
    # the database themselves.
    # Once held, the request is asked again together with the others it waited with.
    deadline = time.monotonic() + req.wait
    held = False
    while True:
        generation = signal.generation
        if held:
            reply = await app.state.held_admissions.admit(req)
        else:
            reply = await anyio.to_thread.run_sync(node.cycle_request, req)
        remaining = deadline - time.monotonic()
        if reply.get("status") != "rejected" or reply.get("timeout") is None or remaining <= 0:
            return reply
        held = True
        await signal.wait_after(generation, remaining)
        if signal.closed:  # shutting down: the rejection stands, the worker asks again later
            return reply


class BodyBudget:
    """Bytes of worker request bodies and WebSocket messages held in memory, all
    connections together. Readers take room as bytes arrive and give it back once the
    request is answered; one that finds no room stops reading (TCP backpressure) for up
    to ``timeout`` seconds, then fails with a 503 and gives its bytes back, so readers
    holding partial bodies cannot wait on each other for ever."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit, self.timeout = limit, timeout
        self.used = 0
        self._freed = asyncio.Event()

    async def take(self, n: int) -> None:
        with anyio.move_on_after(self.timeout):
            while self.used + n > self.limit:
                await self._freed.wait()
        if self.used + n > self.limit:
            raise UnavailableError("the node is receiving too many reports at once; retry later")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()
        self._freed = asyncio.Event()


async def _body_chunks(request: Request, limit: int | None):
    """The body's chunks as they arrive: at most ``limit`` bytes (413) and no silence
    longer than ``read_idle_timeout`` (408), so a stalled client holds nothing but its
    own connection."""
    too_large = f"the body is larger than the node accepts ({limit} bytes)"
    most: float = limit if limit is not None else float("inf")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > most:
        raise PayloadTooLargeError(too_large)
    idle = _settings(request).read_idle_timeout
    size, more = 0, True
    while more:
        message = None
        with anyio.move_on_after(idle):
            message = await request.receive()
        if message is None:
            client = request.client.host if request.client else "a client"
            log.info("%s %s from %s: no body bytes for %g s, answered 408", request.method,
                     request.url.path, client, idle)
            raise RequestTimeoutError(f"the body stopped arriving (nothing for {idle:g} s)")
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > most:
            raise PayloadTooLargeError(too_large)
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _body_chunks(request, limit)])


@contextlib.asynccontextmanager
async def _worker_body(request: Request):
    """A worker request's body, its bytes taken from the node's body budget as they
    arrive and given back on leaving the block."""
    budget: BodyBudget = request.app.state.body_budget
    chunks, taken = [], 0
    try:
        async for chunk in _body_chunks(request, _settings(request).max_body_bytes):
            await budget.take(len(chunk))
            taken += len(chunk)
            chunks.append(chunk)
        yield b"".join(chunks)
    finally:
        budget.give(taken)


_CHUNK = 1 << 20


def _bytes_response(data: bytes) -> Response:
    """Octet-stream; big bodies go out in 1 MiB slices of the cached bytes (no copies), so
    each connection waits on socket backpressure instead of buffering a whole model."""
    if len(data) <= _CHUNK:
        return Response(data, media_type="application/octet-stream")
    view = memoryview(data)

    async def chunks():
        for i in range(0, len(view), _CHUNK):
            yield view[i : i + _CHUNK]

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(len(data))},
    )


def _error_response(exc: BaseException, **extra: Any) -> JSONResponse:
    status, message = to_status(exc)
    _drop_tracebacks(exc)
    # after a 408 the rest of the body may still come, or never: do not wait for it
    headers = {"connection": "close"} if status == 408 else None
    return JSONResponse(_wire.error_body(message, **extra), status_code=status, headers=headers)


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Forget an answered error's tracebacks (its causes' too).

    An error raised in a worker thread sits in a reference cycle (anyio's future, the
    error, its traceback, the awaiting frame) that only the cyclic GC frees, and an idle
    node rarely runs it: until then every frame's locals live on, among them a refused
    report's body and diff (four 60 MiB reports kept ~1 GB). Without the tracebacks the
    frames, and the bytes, are freed at once.
    """
    while exc is not None and exc.__traceback__ is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _node(request) -> GridNode:
    return request.app.state.node


def _settings(request) -> Settings:
    return request.app.state.settings


# --- HTTP worker API ------------------------------------------------------------------------
def _worker_post(kind: str):
    async def endpoint(request: Request) -> Response:
        # the report slot is taken once the body is in: a slow upload holds no slot
        gate = request.app.state.report_gate if kind == _wire.REPORT else None
        try:
            async with _worker_body(request) as body, gate or contextlib.nullcontext():
                data = await dispatch(request.app, kind, _parse_json(body))
        except Exception as e:  # noqa: BLE001 - the table decides
            return _error_response(e, **_error_extra(kind))
        return JSONResponse(data)

    return endpoint


def _asset_get(kind: str):
    async def endpoint(request: Request) -> Response:
        try:
            data = await fetch_asset(request.app, kind, dict(request.query_params))
        except Exception as e:  # noqa: BLE001
            return _error_response(e)
        return _bytes_response(data)

    return endpoint


async def speed_test(request: Request) -> Response:
    """``GET`` downloads a multipart body (field ``sample``), ``GET ?is_ping`` and ``POST``
    (upload, body read and dropped) answer ``{}``: as PyGrid, plus a worker id check."""
    try:
        worker_id = request.query_params.get("worker_id")
        if not worker_id:
            raise InvalidRequestError("'worker_id' is required")
        await anyio.to_thread.run_sync(_node(request).check_worker, worker_id)
    except Exception as e:  # noqa: BLE001
        return _error_response(e)
    if request.method == "POST":
        try:
            async for _ in _body_chunks(request, None):  # dropped: any size
                pass
        except Exception as e:  # noqa: BLE001
            return _error_response(e)
        return JSONResponse({})
    if "is_ping" in request.query_params:
        return JSONResponse({})
    size = _settings(request).speed_test_bytes
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="sample"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = b"x" * (1 << 20)

    async def body():
        yield head
        left = size
        while left > 0:
            piece = chunk if left >= len(chunk) else chunk[:left]
            left -= len(piece)
            yield piece
        yield tail

    return StreamingResponse(
        body(),
        media_type=f"multipart/form-data; boundary={boundary}",
        headers={"content-length": str(len(head) + size + len(tail)), "cache-control": "no-store"},
    )


# --- WebSocket ------------------------------------------------------------------------------
def _parse_binary_header(head: bytes) -> Any:
    """The JSON header of a binary frame: strict UTF-8 (``json.loads`` would also guess
    UTF-16 and UTF-32 from bytes), then JSON."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the binary frame's header is not UTF-8: {e}") from None
    return _parse_json(text, "the binary frame's header", check=False)


def _too_large(kind: str, size: int, limit: int) -> PayloadTooLargeError:
    what = kind.rsplit("get-", 1)[-1]
    return PayloadTooLargeError(
        f"the {what} is {size} bytes, more than the {limit} bytes this socket takes "
        f"('max_bytes'): download it over HTTP (GET /{kind})"
    )


async def websocket_endpoint(ws: WebSocket) -> None:  # noqa: C901 - the receive loop and its dispatch
    # A client that offers gridfl.binary.2 learns from the handshake that this node takes
    # binary reports and serves downloads over the socket. syft.js offers none (nor does a
    # client offering only other subprotocols): plain JSON, as ever.
    subprotocol = _wire.select_subprotocol(ws.scope.get("subprotocols"))
    downloads = subprotocol == _wire.BINARY_SUBPROTOCOL
    await ws.accept(subprotocol=subprotocol)
    send_lock = anyio.Lock()
    in_flight = anyio.Semaphore(32)
    budget: BodyBudget = ws.app.state.body_budget

    async def send(reply: dict | bytes) -> None:
        async with send_lock:
            if isinstance(reply, bytes):
                await ws.send_bytes(reply)
            else:
                await ws.send_text(json.dumps(reply, allow_nan=False))

    async def handle(text: str | bytes, refused: Exception | None) -> None:
        kind, request_id = None, None
        reply: dict | bytes
        try:
            payload = None
            if isinstance(text, str):
                frame = _parse_json(text, "the message", check=False)
            else:  # a binary report (gridfl extension): JSON header + raw diff bytes
                head, payload = _wire.split_binary_frame(text)
                frame = _parse_binary_header(head)
            if isinstance(frame, dict):  # for the error reply's envelope, if it comes to that
                request_id = _wire.echoable_request_id(frame)
                kind = frame.get("type") if isinstance(frame.get("type"), str) else None
            kind, data, request_id = _wire.parse_ws_frame(frame)
            if refused is not None:  # no room in the body budget
                raise refused
            if payload is not None:
                # validated by parse_report in the handler, exactly as a JSON report
                data = _wire.binary_report_data(kind, data, payload)
            if kind == _wire.SOCKET_PING:
                reply = _wire.ws_reply(None, {"alive": "True"}, request_id)
            elif kind in HANDLERS:
                gate = ws.app.state.report_gate if kind == _wire.REPORT else None
                async with gate or contextlib.nullcontext():
                    result = await dispatch(ws.app, kind, data)
                reply = _wire.ws_reply(kind, result, request_id)
            elif downloads and kind in ASSETS:
                limit = _wire.parse_max_bytes(data)
                blob = await fetch_asset(ws.app, kind, data)  # as the HTTP GET
                if limit is not None and len(blob) > limit:
                    raise _too_large(kind, len(blob), limit)
                reply = _wire.encode_binary_reply(kind, blob, request_id)
            elif kind == _wire.HOST_TRAINING:
                raise InvalidRequestError(
                    "hosting over the WebSocket is not supported: use the admin API "
                    "(POST /gridfl/v1/processes, see docs/protocol.md)"
                )
            else:
                raise InvalidRequestError(f"unknown message type {kind!r}")
        except Exception as e:  # noqa: BLE001
            status, message = to_status(e)
            _drop_tracebacks(e)
            reply = _wire.ws_error(
                kind, message, request_id, status_code=status, **_error_extra(kind)
            )
        with contextlib.suppress(Exception):
            await send(reply)

    async def run(text: str | bytes, taken: int, refused: Exception | None) -> None:
        try:
            with ws.app.state.ws_answering.track():
                await handle(text, refused)
        finally:
            in_flight.release()
            budget.give(taken)

    try:
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text = message.get("text")
                    if text is None:  # a binary frame (a report, or answered with an error)
                        text = message.get("bytes") or b""
                    await in_flight.acquire()
                    # the next message is not read while there is no room for this one
                    taken, refused = len(text), None  # str: ~bytes (JSON is mostly ASCII)
                    try:
                        await budget.take(taken)
                    except UnavailableError as e:
                        taken, refused = 0, e
                    tg.start_soon(run, text, taken, refused)
            except WebSocketDisconnect:
                pass
    except Exception:
        log.debug("websocket closed with an error", exc_info=True)


# --- admin API ------------------------------------------------------------------------------
def _admin(fn):
    async def endpoint(request: Request) -> Response:
        try:
            check_admin(request.headers.get("authorization"), _settings(request).admin_token)
            return await fn(request)
        except Exception as e:  # noqa: BLE001
            return _error_response(e)

    return endpoint


def _pv(request: Request) -> tuple[str, str | None]:
    name, version = request.path_params["name"], request.path_params.get("version")
    _wire.check_text(name, "the process name")
    if version is not None:
        _wire.check_text(version, "the process version")
    return name, version


def _checkpoint_ref(ref: str) -> str:
    """A checkpoint number (ASCII digits, fits a database integer) or an alias."""
    _wire.check_text(ref, "the checkpoint")
    if ref.isdigit() and not (ref.isascii() and int(ref) < 1 << 63):
        raise NotFoundError(
            f"this process has no checkpoint {ref!r} (a checkpoint is a number or an alias "
            "such as 'latest')"
        )
    return ref


@_admin
async def host_process(request: Request) -> Response:
    body = await _read_body(request, _settings(request).max_admin_body_bytes)
    node = _node(request)
    result = await anyio.to_thread.run_sync(lambda: node.host(_wire.parse_json(body)))
    return JSONResponse(result, status_code=201)


@_admin
async def list_processes(request: Request) -> Response:
    return JSONResponse(
        {"processes": await anyio.to_thread.run_sync(_node(request).list_processes)}
    )


def _int_param(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key, str(default))
    if not (raw.isascii() and raw.isdigit() and low <= int(raw) <= high):
        raise InvalidRequestError(f"{key} must be an integer from {low} to {high}, got {raw!r:.40}")
    return int(raw)


def _wait_param(request: Request) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= _wire.MAX_WAIT:  # also NaN
        raise InvalidRequestError(
            f"wait must be a number of seconds from 0 to {_wire.MAX_WAIT:g}, got {raw!r:.40}"
        )
    return wait


async def _hold_status(app, name: str, version: str | None, after: int | None, wait: float):
    """Return once a cycle newer than ``after`` (default: the newest closed one now) has
    closed, the process is no longer running, or ``wait`` seconds pass. The node's cycle
    signal wakes the holder, so a watcher need not poll."""
    node: GridNode = app.state.node
    signal: CycleSignal = app.state.cycle_signal
    deadline = time.monotonic() + wait
    while True:
        generation = signal.generation
        status, newest = await anyio.to_thread.run_sync(node.progress, name, version)
        after = newest if after is None else after
        remaining = deadline - time.monotonic()
        if newest > after or status != "running" or remaining <= 0 or signal.closed:
            return
        await signal.wait_after(generation, remaining)


@_admin
async def process_status(request: Request) -> Response:
    name, version = _pv(request)
    last = _int_param(request, "cycles", 100, 1, _wire.MAX_STATUS_CYCLES)
    wait = _wait_param(request)
    after = None
    if "after" in request.query_params:
        after = _int_param(request, "after", 0, 0, MAX_INT)
    if wait > 0:
        await _hold_status(request.app, name, version, after, wait)
    node = _node(request)
    status = await anyio.to_thread.run_sync(lambda: node.status(name, version, last=last))
    return JSONResponse(status)


@_admin
async def delete_process(request: Request) -> Response:
    name, version = _pv(request)
    return JSONResponse(await anyio.to_thread.run_sync(_node(request).delete, name, version))


@_admin
async def stop_process(request: Request) -> Response:
    name, version = _pv(request)
    return JSONResponse(await anyio.to_thread.run_sync(_node(request).stop, name, version))


@_admin
async def get_checkpoint(request: Request) -> Response:
    name, version = _pv(request)
    ref = _checkpoint_ref(request.path_params.get("ref", "latest"))
    data = await anyio.to_thread.run_sync(_node(request).checkpoint, name, version, ref)
    return _bytes_response(data)


@_admin
async def retrieve_model(request: Request) -> Response:
    """PyGrid's ``/model-centric/retrieve-model`` (name, version?, checkpoint?), admin only."""
    q = request.query_params
    name = q.get("name")
    if not name:
        raise InvalidRequestError("'name' is required")
    version = q.get("version") or None
    _wire.check_text(name, "'name'")
    if version is not None:
        _wire.check_text(version, "'version'")
    ref = _checkpoint_ref(q.get("checkpoint") or "latest")
    data = await anyio.to_thread.run_sync(_node(request).checkpoint, name, version, ref)
    return Response(data, media_type="application/octet-stream")


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3 description of this HTTP API (gridfl/server/openapi.py)."""
    from gridfl.server.openapi import spec

    return JSONResponse(spec())


async def health(request: Request) -> Response:
    node = _node(request)
    return JSONResponse(
        {
            "status": "ok",
            "version": gridfl.__version__,
            "database": node.engine.dialect.name,
        }
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown path 404, wrong method 405) as JSON ``{"error"}`` too."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    message = f"{exc.detail}: {request.method} {request.url.path}"
    if exc.status_code == 404:
        message += " (the API is described at GET /openapi.json and in docs/protocol.md)"
    return JSONResponse(_wire.error_body(message), status_code=exc.status_code, headers=exc.headers)


# --- lifespan: database, migrations, the deadline timer -------------------------------------
async def _deadline_timer(node: GridNode, settings: Settings, wake: asyncio.Event) -> None:
    """Close cycles at their deadlines: sleep until the next one or until a cycle opens."""
    while True:
        delay = settings.timer_max_sleep
        try:
            await anyio.to_thread.run_sync(node.close_due_cycles)
            nxt = await anyio.to_thread.run_sync(node.next_deadline)
            if nxt is not None:
                delay = min(delay, max(0.0, nxt - time.time()) + 0.005)
        except Exception:
            log.exception("deadline timer")
        wake.clear()
        with anyio.move_on_after(delay):
            await wake.wait()


async def _cycle_watcher(node: GridNode, settings: Settings, on_change: Callable[[], None]):
    """Several server processes on one database: every ``long_poll_recheck`` seconds look
    whether a cycle opened or closed (one cheap query per process, however many workers
    wait) and, if so, wake this process's long-polled cycle requests and deadline timer."""
    last = None
    while True:
        await anyio.sleep(settings.long_poll_recheck)
        try:
            marker = await anyio.to_thread.run_sync(node.cycle_marker)
        except Exception:
            log.debug("cycle watcher", exc_info=True)
            continue
        if last is not None and marker != last:
            on_change()
        last = marker


async def _cycle_listener(
    node: GridNode, on_change: Callable[[], None], listening: asyncio.Event
) -> None:
    """PostgreSQL: wake this process's held requests and deadline timer the moment another
    server process on the database opens a cycle or stops a process (``LISTEN`` on
    ``CYCLE_CHANNEL``). Without it they would wait for :func:`_cycle_watcher`'s next look,
    up to ``long_poll_recheck`` seconds, while the opener's own waiters took every seat.
    The watcher stays as the fallback: a lost connection is retried every few seconds.
    It needs a direct connection (or a pooler in session mode): through a pooler in
    transaction mode LISTEN succeeds and never hears anything."""
    warned = False
    params = None
    while True:
        try:
            import psycopg

            if params is None:
                _, params = node.engine.dialect.create_connect_args(node.engine.url)
                params.pop("context", None)  # SQLAlchemy's type adapters: not for LISTEN
                # TCP keepalives: a connection that dies silently is noticed within a minute
                params.update(keepalives=1, keepalives_idle=30, keepalives_interval=10,
                              keepalives_count=3)
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
            async with conn:
                await conn.execute(f"LISTEN {CYCLE_CHANNEL}")
                listening.set()
                warned = False
                on_change()  # a cycle may have opened while this process was not listening
                async for note in conn.notifies():
                    if note.payload != node.instance_id:
                        on_change()
        except Exception as e:  # noqa: BLE001 - e.g. the database restarts; retry
            if not warned:
                log.warning("cycle listener: %s; retrying (cycles opened by other server "
                            "processes are seen within long_poll_recheck meanwhile)", e)
                warned = True
        await anyio.sleep(3)


class Answering:
    """Counts the WebSocket requests being answered, so that shutdown can let them send
    their replies before uvicorn closes the sockets (1012) under them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self):
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def idle(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._idle.wait()


async def release_held(app: Starlette, grace: float = 2.0) -> None:
    """Answer every held request now and hold no new ones, then give the WebSocket
    requests being answered up to ``grace`` seconds to send their replies: the server is
    shutting down. (uvicorn waits for HTTP requests before it stops, and a held one can
    take 60 s; it closes WebSockets at once.)"""
    signal: CycleSignal | None = getattr(app.state, "cycle_signal", None)
    if signal is not None:
        signal.close()
        await app.state.ws_answering.idle(grace)


def create_app(settings: Settings | None = None, node: GridNode | None = None) -> Starlette:
    """The grid node as an ASGI app. The database is opened (and migrated) at startup."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        own = node is None
        n: GridNode = node if node is not None else await anyio.to_thread.run_sync(
            GridNode, settings
        )
        app.state.node = n
        app.state.report_gate = anyio.Semaphore(max(1, settings.max_concurrent_reports))
        app.state.body_budget = BodyBudget(
            max(settings.body_buffer_bytes, settings.max_body_bytes), settings.read_idle_timeout
        )
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        signal = app.state.cycle_signal = CycleSignal()
        app.state.held_admissions = HeldAdmissions(n)
        app.state.ws_answering = Answering()

        def on_cycles_changed() -> None:
            loop.call_soon_threadsafe(wake.set)
            loop.call_soon_threadsafe(signal.notify)

        n.on_cycles_changed = on_cycles_changed
        timer = asyncio.create_task(_deadline_timer(n, settings, wake))
        tasks = [timer, asyncio.create_task(_cycle_watcher(n, settings, on_cycles_changed))]
        if n.engine.dialect.name == "postgresql":
            listening = asyncio.Event()
            tasks.append(asyncio.create_task(_cycle_listener(n, on_cycles_changed, listening)))
            # up (answering /health) only once other processes' cycles reach it at once
            with anyio.move_on_after(10):
                await listening.wait()
            if not listening.is_set():
                log.warning("not yet listening for other processes' cycles after 10 s; "
                            "starting anyway (they are seen within long_poll_recheck)")
        log.info("grid node up: database %s", n.engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            n.on_cycles_changed = lambda: None
            if own:
                n.close()

    mc = "/model-centric"
    routes = [
        WebSocketRoute("/", websocket_endpoint),
        Route(f"{mc}/authenticate", _worker_post(_wire.AUTHENTICATE), methods=["POST"]),
        Route(f"{mc}/cycle-request", _worker_post(_wire.CYCLE_REQUEST), methods=["POST"]),
        Route(f"{mc}/report", _worker_post(_wire.REPORT), methods=["POST"]),
        *[Route(f"/{kind}", _asset_get(kind), methods=["GET"]) for kind in ASSETS],
        Route(f"{mc}/speed-test", speed_test, methods=["GET", "POST"]),
        Route(f"{mc}/retrieve-model", retrieve_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/gridfl/v1/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/gridfl/v1/processes", host_process, methods=["POST"]),
        Route("/gridfl/v1/processes", list_processes, methods=["GET"]),
        Route("/gridfl/v1/processes/{name}", process_status, methods=["GET"]),
        Route("/gridfl/v1/processes/{name}/{version}", process_status, methods=["GET"]),
        Route("/gridfl/v1/processes/{name}/{version}", delete_process, methods=["DELETE"]),
        Route("/gridfl/v1/processes/{name}/{version}/stop", stop_process, methods=["POST"]),
        Route(
            "/gridfl/v1/processes/{name}/{version}/checkpoints/{ref}",
            get_checkpoint,
            methods=["GET"],
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
        middleware=[
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
            )
        ],
    )
    app.state.settings = settings
    return app
