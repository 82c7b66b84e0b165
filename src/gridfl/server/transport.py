"""The uvicorn protocols a node runs with: uvicorn's own, plus the limits a node facing
devices directly (no proxy) needs.

HTTP: httptools (llhttp) has no limit on a request's head, so a 300 MB header line was
read, held and answered. :class:`HttpToolsGuard` bounds the head's bytes, its header
count and the time it may take, and answers 431 / 408. Without httptools uvicorn's h11
is used, whose ``h11_max_incomplete_event_size`` bounds the head (see
:func:`protocol_options`). h11 would bound the head on its own, but it costs about twice
the server CPU of httptools per report body.

WebSocket: uvicorn's websockets (sans-I/O) protocol, except that bytes arriving count as
a live peer (a 9 MB report frame over a slow link delays the peer's pong past the ping
timeout, and was closed mid-frame), and invalid UTF-8 in a text frame is one quiet log
line instead of an ERROR with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("gridfl.server")


class HeadRefused(Exception):
    """Raised from a parser callback: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _client(transport) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else "a client"


def _httptools_guard() -> type | None:  # noqa: C901 - defines a class of small methods
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn without the 'standard' extra
        return None

    class HttpToolsGuard(HttpToolsProtocol):
        """uvicorn's httptools protocol with limits on each request's head (request line
        and headers): ``max_head_bytes``, ``max_headers``, and ``head_timeout`` seconds
        from the connection opening, or the next request's first byte, to the head's end.
        """

        max_head_bytes = 32 * 1024
        max_headers = 100
        head_timeout = 30.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_open = True  # the next request's head has not ended yet
            self.head_bytes = 0  # bytes received while the head is open (over chunks)
            self.head_size = 0  # the head's bytes seen by the callbacks (within a chunk)
            self.header_count = 0
            self.head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # as uvicorn's, plus the refusals of the callbacks below
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError as e:
                refused = e.__context__
                if isinstance(refused, HeadRefused):
                    self.refuse(refused.status, str(refused))
                else:
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                return
            if self.head_open:
                # A head longer than a chunk: httptools holds the unfinished header line
                # (llhttp itself buffers nothing), so it holds at most the limit + a chunk.
                self.head_bytes += len(data)
                if self.head_bytes > self.max_head_bytes:
                    self.refuse(431, self._too_large())

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self.head_open:  # a request after the first on this connection
                self.head_open, self.head_bytes = True, 0
                self._arm_head_timer()
            self.header_count = self.head_size = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.header_count += 1
            if self.header_count > self.max_headers:
                raise HeadRefused(431, f"the request has more than {self.max_headers} headers")
            self._count(len(name) + len(value) + 4)  # "name: value\r\n"
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            # a head that ends within one chunk (up to 256 KiB) is measured here
            self.head_size += n
            if self.head_size > self.max_head_bytes:
                raise HeadRefused(431, self._too_large())

        def _too_large(self) -> str:
            return f"the request head is larger than {self.max_head_bytes} bytes"

        def on_headers_complete(self) -> None:
            self.head_open = False
            self._cancel_head_timer()
            super().on_headers_complete()

        def refuse(self, status: int, message: str) -> None:
            """Answer ``status`` with ``message`` and close (uvicorn's 400, any status)."""
            log.warning("refused a request from %s: %s (%d)", _client(self.transport), message,
                        status)
            self._cancel_head_timer()
            body = message.encode()
            content = [STATUS_LINE[status]]
            content += [b"%s: %s\r\n" % kv for kv in self.server_state.default_headers]
            content += [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
            self.transport.write(b"".join(content))
            self.transport.close()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.transport.is_closing():
                return
            busy = self.cycle is not None and not self.cycle.response_complete
            if self.head_bytes and not busy:
                self.refuse(408, f"the request head did not arrive within {self.head_timeout:g} s")
            else:  # idle (nothing sent), or a pipelined head behind a running request
                self.transport.close()

    return HttpToolsGuard


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol; bytes arriving count as a live peer, and a text
    frame that is not UTF-8 closes the socket (1007) with one quiet log line."""

    def data_received(self, data: bytes) -> None:
        if self.pong_timer is not None and self.ping_timeout is not None:
            # A ping is out. The peer's pong waits behind whatever it is sending (a report
            # frame over a slow link can take minutes): it is alive while bytes arrive,
            # and only ping_timeout seconds of silence close it.
            self.pong_timer.cancel()
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
        super().data_received(data)

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type != "text" or self.close_sent:
            return super().send_receive_event_to_app()
        # as uvicorn's, which logs bad UTF-8 (a client's mistake) as an ERROR + traceback
        data = b"".join(self.frames)
        self.frames = []
        try:
            text = data.decode()
        except UnicodeDecodeError:
            log.info("closed a WebSocket from %s: a text frame is not UTF-8 (1007)",
                     _client(self.transport))
            self.conn.send_close(1007, "invalid UTF-8")
            self.handle_parser_exception()
            return
        self.queue.put_nowait({"type": "websocket.receive", "text": text})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()


def protocol_options(max_head_bytes: int, max_headers: int, head_timeout: float) -> dict:
    """uvicorn options choosing the protocols above, with these head limits."""
    guard = _httptools_guard()
    if guard is None:  # pragma: no cover - h11 bounds the head's bytes (and so the count)
        return {"http": "h11", "h11_max_incomplete_event_size": max_head_bytes,
                "ws": WebSocketProtocol}
    limits = {"max_head_bytes": max_head_bytes, "max_headers": max_headers,
              "head_timeout": head_timeout}
    return {"http": type("HttpToolsGuard", (guard,), limits), "ws": WebSocketProtocol}
