"""The HTTP routes: the worker API under ``/model-centric/`` (the same handlers as the
WebSocket), downloads, the speed test, and the admin API under ``/gridfl/v1/``. Routes
stay thin: decode, call one handler, encode. Their errors are answered by the handlers
registered once in :data:`EXCEPTION_HANDLERS`."""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

import anyio
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute

import gridfl
from gridfl import _messages
from gridfl._exceptions import GridflError, InvalidRequestError, NotFoundError
from gridfl.server.auth import check_admin
from gridfl.server.bodies import body_chunks, parse_worker_json, read_body, worker_body
from gridfl.server.config import MAX_INT
from gridfl.server.errors import drop_tracebacks, to_status
from gridfl.server.handlers import ASSETS, dispatch, error_extra, fetch_asset
from gridfl.server.held import hold_status
from gridfl.server.service import GridNode
from gridfl.server.settings import Settings
from gridfl.server.websocket import websocket_endpoint

_CHUNK = 1 << 20


def bytes_response(data: bytes) -> Response:
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


def error_response(exc: BaseException, **extra: Any) -> JSONResponse:
    status, message = to_status(exc)
    drop_tracebacks(exc)
    # after a 408 the rest of the body may still come, or never: do not wait for it
    headers = {"connection": "close"} if status == 408 else None
    return JSONResponse(_messages.error_body(message, **extra), status_code=status, headers=headers)


def _node(request) -> GridNode:
    return request.app.state.node


def _settings(request) -> Settings:
    return request.app.state.settings


# --- HTTP worker API ------------------------------------------------------------------------
def _worker_post(kind: str):
    async def endpoint(request: Request) -> Response:
        # the report slot is taken once the body is in: a slow upload holds no slot
        gate = request.app.state.report_gate if kind == _messages.REPORT else None
        async with worker_body(request) as body, gate or contextlib.nullcontext():
            data = await dispatch(request.app, kind, parse_worker_json(body))
        return JSONResponse(data)

    return endpoint


def _asset_get(kind: str):
    async def endpoint(request: Request) -> Response:
        data = await fetch_asset(request.app, kind, dict(request.query_params))
        return bytes_response(data)

    return endpoint


async def speed_test(request: Request) -> Response:
    """``GET`` downloads a multipart body (field ``sample``), ``GET ?is_ping`` and ``POST``
    (upload, body read and dropped) answer ``{}``: as PyGrid, plus a worker id check."""
    worker_id = request.query_params.get("worker_id")
    if not worker_id:
        raise InvalidRequestError("'worker_id' is required")
    await anyio.to_thread.run_sync(_node(request).check_worker, worker_id)
    if request.method == "POST":
        async for _ in body_chunks(request, None):  # dropped: any size
            pass
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


# --- admin API ------------------------------------------------------------------------------
def _admin(fn):
    async def endpoint(request: Request) -> Response:
        check_admin(request.headers.get("authorization"), _settings(request).admin_token)
        return await fn(request)

    return endpoint


def _pv(request: Request) -> tuple[str, str | None]:
    name, version = request.path_params["name"], request.path_params.get("version")
    _messages.check_text(name, "the process name")
    if version is not None:
        _messages.check_text(version, "the process version")
    return name, version


def _checkpoint_ref(ref: str) -> str:
    """A checkpoint number (ASCII digits, fits a database integer) or an alias."""
    _messages.check_text(ref, "the checkpoint")
    if ref.isdigit() and not (ref.isascii() and int(ref) < 1 << 63):
        raise NotFoundError(
            f"this process has no checkpoint {ref!r} (a checkpoint is a number or an alias "
            "such as 'latest')"
        )
    return ref


@_admin
async def host_process(request: Request) -> Response:
    body = await read_body(request, _settings(request).max_admin_body_bytes)
    node = _node(request)
    result = await anyio.to_thread.run_sync(lambda: node.host(_messages.parse_json(body)))
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
    if not 0 <= wait <= _messages.MAX_WAIT:  # also NaN
        raise InvalidRequestError(
            f"wait must be a number of seconds from 0 to {_messages.MAX_WAIT:g}, got {raw!r:.40}"
        )
    return wait


async def held_status_request(request: Request) -> tuple[str, str | None, int]:
    """A status request's process, its ``cycles`` (how many to list) and, with ``wait``,
    held until a cycle newer than ``after`` closes (shared with the dashboard's)."""
    name, version = _pv(request)
    last = _int_param(request, "cycles", 100, 1, _messages.MAX_STATUS_CYCLES)
    wait = _wait_param(request)
    after = None
    if "after" in request.query_params:
        after = _int_param(request, "after", 0, 0, MAX_INT)
    if wait > 0:
        await hold_status(request.app, name, version, after, wait)
    return name, version, last


@_admin
async def process_status(request: Request) -> Response:
    name, version, last = await held_status_request(request)
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
    return bytes_response(data)


@_admin
async def retrieve_model(request: Request) -> Response:
    """PyGrid's ``/model-centric/retrieve-model`` (name, version?, checkpoint?), admin only."""
    q = request.query_params
    name = q.get("name")
    if not name:
        raise InvalidRequestError("'name' is required")
    version = q.get("version") or None
    _messages.check_text(name, "'name'")
    if version is not None:
        _messages.check_text(version, "'version'")
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


async def http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown path 404, wrong method 405) as JSON ``{"error"}`` too."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    message = f"{exc.detail}: {request.method} {request.url.path}"
    if exc.status_code == 404:
        message += " (the API is described at GET /openapi.json and in docs/protocol.md)"
    return JSONResponse(
        _messages.error_body(message), status_code=exc.status_code, headers=exc.headers
    )


async def answer_error(request: Request, exc: Exception) -> Response:
    """Every error an endpoint raises, answered as ``{"error": ...}`` with the status
    :func:`to_status` gives (a failed cycle request also carries ``"status": "rejected"``,
    as PyGrid's; a 408 closes the connection, the rest of the body may never come)."""
    kind = request.url.path.lstrip("/")
    return error_response(exc, **error_extra(kind))


#: registered once on the app: the node's own errors, a client gone mid-body and database
#: errors (503 when it is out of reach) by class; any other exception is a bug, answered
#: by :class:`AnswerBugs`
EXCEPTION_HANDLERS: dict[Any, Any] = {
    GridflError: answer_error,
    ClientDisconnect: answer_error,
    SQLAlchemyError: answer_error,
    HTTPException: http_exception,
}


class AnswerBugs:
    """ASGI middleware, inside CORS: an exception no handler knows (a bug) is answered 500
    ``{"error": ...}`` and logged once, with its traceback. Starlette's own last resort
    sits outside CORS (a browser would see a network error, not the 500) and re-raises,
    so the server logged the bug a second time."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # too late for an answer: the connection is cut
                raise
            response = await answer_error(Request(scope), exc)
            await response(scope, receive, send)


def routes() -> list[BaseRoute]:
    """Every HTTP route and the WebSocket, in one table."""
    mc = "/model-centric"
    return [
        WebSocketRoute("/", websocket_endpoint),
        Route(f"{mc}/authenticate", _worker_post(_messages.AUTHENTICATE), methods=["POST"]),
        Route(f"{mc}/cycle-request", _worker_post(_messages.CYCLE_REQUEST), methods=["POST"]),
        Route(f"{mc}/report", _worker_post(_messages.REPORT), methods=["POST"]),
        Route(
            f"/{_messages.EVALUATION_REPORT}",
            _worker_post(_messages.EVALUATION_REPORT),
            methods=["POST"],
        ),
        Route(
            f"/{_messages.SECURE_AGGREGATION}",
            _worker_post(_messages.SECURE_AGGREGATION),
            methods=["POST"],
        ),
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
