"""The WebSocket endpoint at ``/``: JSON frames ``{"type", "data", "request_id"?}``, binary
report frames, and downloads over the socket for clients that negotiate
``gridfl.binary.2``. Each frame is answered concurrently (up to 32 in flight)."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect

from gridfl import _messages
from gridfl._exceptions import InvalidRequestError, PayloadTooLargeError, UnavailableError
from gridfl.server.bodies import BodyBudget, parse_worker_json
from gridfl.server.errors import drop_tracebacks, to_status
from gridfl.server.handlers import ASSETS, HANDLERS, dispatch, error_extra, fetch_asset

log = logging.getLogger("gridfl.server")


def _parse_binary_header(head: bytes) -> Any:
    """The JSON header of a binary frame: strict UTF-8 (``json.loads`` would also guess
    UTF-16 and UTF-32 from bytes), then JSON."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the binary frame's header is not UTF-8: {e}") from None
    return parse_worker_json(text, "the binary frame's header", check=False)


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
    subprotocol = _messages.select_subprotocol(ws.scope.get("subprotocols"))
    downloads = subprotocol == _messages.BINARY_SUBPROTOCOL
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
            payload: memoryview | None = None
            if isinstance(text, str):
                frame = parse_worker_json(text, "the message", check=False)
            else:  # a binary report (gridfl extension): JSON header + raw diff bytes
                head, payload = _messages.split_binary_report(text)
                frame = _parse_binary_header(head)
            if isinstance(frame, dict):  # for the error reply's envelope, if it comes to that
                request_id = _messages.echoable_request_id(frame)
                kind = frame.get("type") if isinstance(frame.get("type"), str) else None
            kind, data, request_id = _messages.parse_ws_frame(frame)
            if refused is not None:  # no room in the body budget
                raise refused
            if payload is not None:
                # validated by parse_report in the handler, exactly as a JSON report
                data = _messages.binary_report_data(kind, data, payload)
                if not downloads and data.get("compression") is not None:
                    raise InvalidRequestError(
                        "a compressed report needs a socket that negotiated the "
                        f"{_messages.BINARY_SUBPROTOCOL!r} subprotocol"
                    )
            if kind == _messages.SOCKET_PING:
                reply = _messages.ws_reply(None, {"alive": "True"}, request_id)
            elif kind in HANDLERS:
                gate = ws.app.state.report_gate if kind == _messages.REPORT else None
                async with gate or contextlib.nullcontext():
                    result = await dispatch(ws.app, kind, data)
                reply = _messages.ws_reply(kind, result, request_id)
            elif downloads and kind in ASSETS:
                limit = _messages.parse_max_bytes(data)
                blob = await fetch_asset(ws.app, kind, data)  # as the HTTP GET
                if limit is not None and len(blob) > limit:
                    raise _too_large(kind, len(blob), limit)
                reply = _messages.encode_binary_reply(kind, blob, request_id)
            elif kind == _messages.HOST_TRAINING:
                raise InvalidRequestError(
                    "hosting over the WebSocket is not supported: use the admin API "
                    "(POST /gridfl/v1/processes, see docs/protocol.md)"
                )
            else:
                raise InvalidRequestError(f"unknown message type {kind!r}")
        except Exception as e:  # noqa: BLE001
            status, message = to_status(e)
            drop_tracebacks(e)
            reply = _messages.ws_error(
                kind, message, request_id, status_code=status, **error_extra(kind)
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
