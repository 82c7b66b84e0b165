"""Reading request bodies and WebSocket messages: size limits, an idle timeout, and one
memory budget for every body being read, so a slow or stalled client costs only its own
connection."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import re
import secrets
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request

from gridfl import _messages
from gridfl._exceptions import (
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnavailableError,
)

log = logging.getLogger("gridfl.server")


def parse_worker_json(body: bytes | str, what: str = "the body", *, check: bool = True) -> Any:
    """A worker message's JSON (:func:`_messages.parse_json`, its values capped).

    A report's base64 ``diff`` (9 MB for a CNN), or a secure-aggregation message's masked
    ``vector``, is decoded straight from the body: the JSON decoder would copy it into a
    str and scan it three times more (UTF-8, the value count, the string), which cost the
    node 8x the decoding itself. The result is the same as parsing the whole body, that
    value then given as its decoded bytes.

        >>> parse_worker_json(b'{"worker_id": "w", "diff": "ZGlmZg=="}')
        {'worker_id': 'w', 'diff': 'ZGlmZg=='}
    """
    if len(body) >= _DIFF_FAST_PATH_BYTES:
        fast = _with_decoded_payload(body, what, check)
        if fast is not None:
            return fast
    return _messages.parse_json(body, what, max_values=_messages.MAX_MESSAGE_VALUES, check=check)


#: bodies from this size on have their payload cut out before the JSON decoder runs
_DIFF_FAST_PATH_BYTES = 64 * 1024
#: where the closing quote of a body's payload is looked for first: its last bytes
_TAIL_BYTES = 4096
#: each large base64 value's key, and the objects it sits in (``BINARY_PAYLOADS``' paths)
_PAYLOAD_PATHS = {path[-1]: path[:-1] for path in _messages.BINARY_PAYLOADS.values()}
_PAYLOAD_AT = re.compile(rb'"(' + "|".join(_PAYLOAD_PATHS).encode() + rb')"\s*:\s*"')


def _decoded(raw: bytes, start: int, end: int) -> bytes | None:
    """``raw[start:end]`` decoded as strict base64, or ``None`` if it is empty or not."""
    if end <= start:
        return None
    try:
        return _messages.b64decode(memoryview(raw)[start:end])
    except (binascii.Error, ValueError):
        return None


def _with_decoded_payload(body: bytes | str, what: str, check: bool) -> Any:
    """The message parsed with its one large base64 value decoded to bytes, or ``None``
    when the body is not one this shortcut can prove equivalent (the caller then parses
    it whole). That value is a report's ``diff`` (at the top, or in a WebSocket frame's
    ``data``) or a secure-aggregation message's masked ``vector`` (in its ``message``).

    The candidate string (after the first ``"diff":`` or ``"vector":``, up to the next
    quote) must decode as strict base64, which has no quote or backslash (no JSON escape
    can hide in it); it is then replaced by a random marker and the rest parsed as JSON:
    only if the marker is then the value of that key, where it belongs, was the
    candidate that value, exactly."""
    # a WebSocket text frame: its UTF-8 bytes (a copy at memory speed; the offsets of
    # the ASCII around the payload are the same)
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    found = _PAYLOAD_AT.search(raw)
    if found is None:
        return None
    key = found.group(1).decode()
    start = found.end()
    # The value ends at the first quote after it. Scanning 9 MB for it, and for a
    # backslash, cost more than decoding: a report's payload is nearly always the last
    # long value, so the first quote of the body's tail is tried, and decoding checks it
    # (standard base64 has neither a quote nor a backslash).
    end = raw.find(b'"', max(start, len(raw) - _TAIL_BYTES))
    decoded = _decoded(raw, start, end)
    if decoded is None:  # the slow way: the first quote
        first = raw.find(b'"', start)
        if first == end:
            return None  # the whole parse says what is wrong with it
        end = first
        decoded = _decoded(raw, start, end)
        if decoded is None:
            return None
    marker = secrets.token_hex(16)
    rest = raw[:start] + marker.encode() + raw[end:]
    try:
        value = _messages.parse_json(
            rest, what, max_values=_messages.MAX_MESSAGE_VALUES, check=check
        )
    except InvalidRequestError:
        return None  # refused with what the whole parse says (its positions are the body's)
    holder = _holder(value, key, marker)
    if holder is None:
        return None
    holder[key] = decoded
    return value


def _holder(value: Any, key: str, marker: str) -> dict | None:
    """The object whose ``key`` is ``marker`` where the message keeps that payload (in
    the message, or a WebSocket frame's ``data``); ``None`` when it is anywhere else."""
    if not isinstance(value, dict):
        return None
    for top in (value, value.get("data")):
        inner = top
        for step in _PAYLOAD_PATHS[key]:
            inner = inner.get(step) if isinstance(inner, dict) else None
        if isinstance(inner, dict) and inner.get(key) == marker:
            return inner
    return None


class BodyBudget:
    """Bytes of worker request bodies and WebSocket messages held in memory, all
    connections together. A body with a ``Content-Length`` takes its whole room before it
    is read (readers that each held part of a body could wait on each other until all
    timed out: 100 concurrent 9 MB reports did); a chunked body takes room as its bytes
    arrive. A reader that finds no room is not read (TCP backpressure) for up to
    ``timeout`` seconds, then gets a 503; room is given back once the request is
    answered."""

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


async def body_chunks(request: Request, limit: int | None):
    """The body's chunks as they arrive: at most ``limit`` bytes (413) and no silence
    longer than ``read_idle_timeout`` (408), so a stalled client holds nothing but its
    own connection."""
    too_large = f"the body is larger than the node accepts ({limit} bytes)"
    most: float = limit if limit is not None else float("inf")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > most:
        raise PayloadTooLargeError(too_large)
    idle = request.app.state.settings.read_idle_timeout
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


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in body_chunks(request, limit)])


@contextlib.asynccontextmanager
async def worker_body(request: Request):
    """A worker request's body, its room taken from the node's body budget (all of it at
    once when the length is declared) and given back on leaving the block."""
    budget: BodyBudget = request.app.state.body_budget
    limit = request.app.state.settings.max_body_bytes
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    chunks, taken = [], 0
    try:
        if declared is not None and declared <= limit:  # larger: body_chunks answers 413
            await budget.take(declared)
            taken = declared
        async for chunk in body_chunks(request, limit):
            if declared is None:
                await budget.take(len(chunk))
                taken += len(chunk)
            chunks.append(chunk)
        yield b"".join(chunks)
    finally:
        budget.give(taken)
