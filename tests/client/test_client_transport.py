"""Transport behaviour that a well-behaved node never shows: silence, drops, disorder.

These run a tiny misbehaving WebSocket server on loopback (and httpx's MockTransport for
the pure retry logic), since the real grid node cannot be told to misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from websockets.asyncio.server import serve

from gridfl import (
    GridError,
    NotFoundError,
    ResponseTimeoutError,
    TransportError,
    UnavailableError,
    _messages,
)
from gridfl.client._transports import HttpTransport, WsTransport


async def _run(behaviour, body, *, subprotocols=None, keep_state=False):
    """Start a WebSocket server whose handler is ``behaviour(ws, state)``; run ``body(url)``
    (``subprotocols``: those the server selects when offered; ``keep_state``: return the
    server's state instead of what ``body`` returned; ``state["offered"]``: the
    subprotocols the client offered, as its handshake header says)."""
    state = {"messages": [], "connections": 0}

    async def handler(ws):
        state["connections"] += 1
        state["offered"] = ws.request.headers.get("Sec-WebSocket-Protocol")
        await behaviour(ws, state)

    async with serve(handler, "127.0.0.1", 0, subprotocols=subprotocols) as server:
        port = server.sockets[0].getsockname()[1]
        result = await body(f"ws://127.0.0.1:{port}/", state)
    return state if keep_state else result


def run(behaviour, body):
    return asyncio.run(_run(behaviour, body))


async def silent(ws, state):
    async for raw in ws:
        state["messages"].append(json.loads(raw))


class TestWebSocket:
    def test_timeout_on_every_request(self):
        """No reply within ``timeout``: ResponseTimeoutError; non-idempotent: sent once."""

        async def body(url, state):
            t = WsTransport(url, timeout=0.2, retries=2)
            with pytest.raises(ResponseTimeoutError, match="Response timeout"):
                await t.call("model-centric/report", {"x": 1}, idempotent=False)
            await asyncio.sleep(0.05)
            assert len(state["messages"]) == 1
            with pytest.raises(ResponseTimeoutError):
                await t.call("model-centric/authenticate", {}, idempotent=True)
            await asyncio.sleep(0.05)
            assert len(state["messages"]) == 1 + 3  # retried twice
            await t.aclose()

        run(silent, body)

    def test_replies_matched_by_request_id(self):
        """Two requests in flight get their own replies even when answered out of order."""

        async def reverse(ws, state):
            first = json.loads(await ws.recv())
            second = json.loads(await ws.recv())
            for msg in (second, first):
                await ws.send(json.dumps({"type": msg["type"], "request_id": msg["request_id"],
                                          "data": {"echo": msg["data"]["n"]}}))
            await silent(ws, state)

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0)
            a, b = await asyncio.gather(t.call("t", {"n": 1}), t.call("t", {"n": 2}))
            assert (a, b) == ({"echo": 1}, {"echo": 2}) and t.connects == 1
            await t.aclose()

        run(reverse, body)

    @pytest.mark.parametrize("binary", [True, False])
    def test_report_frame_follows_the_handshake(self, binary):
        """The client offers gridfl.binary.2 alone (not the never-released
        gridfl.binary-report.1). A node that selects it gets the report as a binary frame
        (length, JSON header, raw diff); one that does not (PyGrid) gets JSON text with the
        diff in base64. Other messages are JSON text either way."""
        diff = bytes(range(256)) * 3

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0)
            await t.call("model-centric/authenticate", {"model_name": "m"})
            reply = await t.call("model-centric/report", {
                "worker_id": "w", "request_key": "k", "diff": diff, "num_samples": 3})
            assert reply == {"status": "success"}
            assert t._conn.subprotocol == (_messages.BINARY_SUBPROTOCOL if binary else None)
            await t.aclose()

        async def node(ws, state):
            async for raw in ws:
                if isinstance(raw, bytes):
                    n = int.from_bytes(raw[:4], "big")
                    msg = json.loads(raw[4 : 4 + n].decode("utf-8"))
                    state["messages"].append(("binary", msg, raw[4 + n :]))
                else:
                    msg = json.loads(raw)
                    state["messages"].append(("text", msg, None))
                await ws.send(json.dumps({"type": msg["type"], "request_id": msg["request_id"],
                                          "data": {"status": "success"}}))

        state = asyncio.run(_run(node, body, subprotocols=[_messages.BINARY_SUBPROTOCOL]
                                 if binary else None, keep_state=True))
        assert state["offered"] == "gridfl.binary.2"
        (auth_kind, _, _), (kind, msg, payload) = state["messages"]
        assert auth_kind == "text" and msg["type"] == "model-centric/report"
        if binary:
            assert kind == "binary" and payload == diff
            assert msg["data"] == {"worker_id": "w", "request_key": "k", "num_samples": 3}
        else:
            assert kind == "text" and payload is None
            assert msg["data"] == {"worker_id": "w", "request_key": "k", "num_samples": 3,
                                   "diff": base64.b64encode(diff).decode()}

    def test_reconnects_after_drop(self):
        """A dropped socket fails the request in flight; retries reconnect and succeed."""

        async def flaky(ws, state):
            msg = json.loads(await ws.recv())
            if state["connections"] == 1:
                await ws.close()
                return
            await ws.send(json.dumps({"type": msg["type"], "request_id": msg["request_id"],
                                      "data": {"ok": True}}))
            await silent(ws, state)

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=2)
            assert await t.call("t", {}, idempotent=True) == {"ok": True}
            assert t.connects == 2
            await t.aclose()

        run(flaky, body)

    def test_drop_fails_non_idempotent_call(self):
        async def closer(ws, state):
            await ws.recv()
            await ws.close()

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=2)
            with pytest.raises(TransportError, match="closed"):
                await t.call("model-centric/report", {}, idempotent=False)
            assert state["connections"] == 1
            await t.aclose()

        run(closer, body)

    def test_node_error_reply(self):
        async def erring(ws, state):
            msg = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": msg["type"], "request_id": msg["request_id"],
                                      "data": {"error": "Model ID not found!"}}))
            await silent(ws, state)

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0)
            with pytest.raises(Exception, match="Model ID not found!"):
                await t.call("t", {})
            await t.aclose()

        run(erring, body)

    def test_downloads_follow_the_handshake(self):
        """fetch goes over the socket only when the node selected gridfl.binary.2; a node
        that selected none (PyGrid) gets no download request (None: HTTP)."""

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0)
            assert await t.fetch("model-centric/get-model", {"model_id": 1}) is None
            assert t._conn.subprotocol is None
            await t.aclose()

        state = asyncio.run(_run(silent, body, keep_state=True))
        assert state["messages"] == [] and state["connections"] == 1

    def test_binary_replies_matched_by_request_id(self):
        """Downloads and a JSON call in flight together, answered in reverse order: each
        gets its own reply; the request is the GET's query plus the frame limit."""
        limit = 2**20

        async def reverse(ws, state):
            msgs = [json.loads(await ws.recv()) for _ in range(3)]
            state["messages"].extend(msgs)
            for msg in reversed(msgs):
                if msg["type"] == "t":
                    await ws.send(json.dumps({"type": "t", "request_id": msg["request_id"],
                                              "data": {"echo": 1}}))
                    continue
                head = json.dumps({"type": msg["type"], "request_id": msg["request_id"]})
                body = f"bytes of {msg['data']['model_id']}".encode()
                await ws.send(len(head).to_bytes(4, "big") + head.encode() + body)
            await silent(ws, state)

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0, max_message=limit)
            got = await asyncio.gather(
                t.fetch("model-centric/get-model", {"model_id": 1, "worker_id": "w"}),
                t.fetch("model-centric/get-model", {"model_id": 2, "worker_id": "w"}),
                t.call("t", {}),
            )
            assert got == [b"bytes of 1", b"bytes of 2", {"echo": 1}]
            assert t._conn.subprotocol == _messages.BINARY_SUBPROTOCOL and t.connects == 1
            await t.aclose()

        state = asyncio.run(_run(reverse, body, subprotocols=[_messages.BINARY_SUBPROTOCOL],
                                 keep_state=True))
        dl = [m for m in state["messages"] if m["type"] == "model-centric/get-model"]
        assert [m["data"] for m in dl] == [
            {"model_id": i, "worker_id": "w", "max_bytes": limit - 4 - 4096} for i in (1, 2)]

    @pytest.mark.parametrize(
        ("reply", "outcome"),
        [
            ({"error": "Model ID not found!", "status_code": 400}, NotFoundError),
            ({"error": "the model is 9 bytes, more than ...", "status_code": 413}, None),
            ({"status": "success"}, GridError),  # JSON without an error: not a download
        ],
    )
    def test_download_json_replies(self, reply, outcome):
        """An error reply raises the node's error; a 413 (too large for this socket) is
        None, so the download goes over HTTP; a JSON success is malformed."""

        async def node(ws, state):
            async for raw in ws:
                msg = json.loads(raw)
                state["messages"].append(msg)
                await ws.send(json.dumps({"type": msg["type"], "request_id": msg["request_id"],
                                          "data": reply}))

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=2)
            if outcome is None:
                keys = {"model_id": 7, "worker_id": "w", "request_key": "k1"}
                assert await t.fetch("model-centric/get-model", keys) is None
                # the next cycle's download of the same model goes straight to HTTP
                keys = {**keys, "request_key": "k2"}
                assert await t.fetch("model-centric/get-model", keys) is None
            else:
                with pytest.raises(outcome) as info:
                    await t.fetch("model-centric/get-model", {})
                assert ("Model ID not found!" in str(info.value)) == (outcome is NotFoundError)
            await t.aclose()

        state = asyncio.run(_run(node, body, subprotocols=[_messages.BINARY_SUBPROTOCOL],
                                 keep_state=True))
        assert len(state["messages"]) == 1  # none of these is retried or asked again

    def test_too_large_is_forgotten_on_a_new_socket(self):
        """A download refused as too large goes over HTTP while the socket lasts; after a
        reconnect (perhaps to a node restarted with a larger limit) it is asked for over
        the socket again."""

        async def node(ws, state):
            async for raw in ws:
                msg = json.loads(raw)
                state["messages"].append(msg)
                if len(state["messages"]) == 1:
                    reply = {"error": "the model is 9 bytes, more than ...", "status_code": 413}
                    await ws.send(json.dumps({"type": msg["type"],
                                              "request_id": msg["request_id"], "data": reply}))
                else:
                    head = json.dumps({"type": msg["type"], "request_id": msg["request_id"]})
                    await ws.send(len(head).to_bytes(4, "big") + head.encode() + b"model")

        async def body(url, state):
            t = WsTransport(url, timeout=2, retries=0)
            keys = {"model_id": 7, "worker_id": "w", "request_key": "k1"}
            assert await t.fetch("model-centric/get-model", keys) is None
            assert await t.fetch("model-centric/get-model", keys) is None  # not asked
            assert len(state["messages"]) == 1
            await t._conn.close()  # the socket drops (the node restarts)
            assert await t.fetch("model-centric/get-model", keys) == b"model"
            assert t.connects == 2 and len(state["messages"]) == 2
            await t.aclose()

        asyncio.run(_run(node, body, subprotocols=[_messages.BINARY_SUBPROTOCOL]))

    def test_download_timeout_falls_back(self):
        """Over the socket the timeout covers the whole transfer: when it runs out the
        download is left to HTTP (None) instead of being retried over the socket."""

        async def body(url, state):
            t = WsTransport(url, timeout=0.2, retries=2)
            assert await t.fetch("model-centric/get-plan", {}) is None
            await asyncio.sleep(0.05)
            assert len(state["messages"]) == 1
            await t.aclose()

        asyncio.run(_run(silent, body, subprotocols=[_messages.BINARY_SUBPROTOCOL]))

    def test_broken_binary_frame_is_ignored(self):
        """A binary frame whose framing or header is broken matches no request: the
        download times out (None) and the socket keeps working."""

        async def node(ws, state):
            async for raw in ws:
                msg = json.loads(raw)
                state["messages"].append(msg)
                if msg["type"] == "t":
                    await ws.send(json.dumps({"type": "t", "request_id": msg["request_id"],
                                              "data": {"ok": True}}))
                else:
                    await ws.send(b"\x00\x00\x00\xffnot json")
                    await ws.send(b"\x00\x00\x00\x02[]" + b"payload")

        async def body(url, state):
            t = WsTransport(url, timeout=0.3, retries=0)
            assert await t.fetch("model-centric/get-model", {}) is None
            assert await t.call("t", {}) == {"ok": True} and t.connects == 1
            await t.aclose()

        asyncio.run(_run(node, body, subprotocols=[_messages.BINARY_SUBPROTOCOL]))

    def test_connect_refused(self):
        async def main():
            t = WsTransport("ws://127.0.0.1:9/", timeout=1, retries=1)
            with pytest.raises(TransportError, match="cannot open WebSocket"):
                await t.call("t", {}, idempotent=False)

        asyncio.run(main())


class TestHttp:
    def make(self, handler, retries=2):
        client = httpx.AsyncClient(base_url="http://node", transport=httpx.MockTransport(handler))
        return HttpTransport("http://node", timeout=1, retries=retries, client=client)

    def test_retries_unavailable_then_succeeds(self):
        calls = []

        def handler(request):
            calls.append(request.url.path)
            if len(calls) < 3:
                return httpx.Response(503, json={"error": "busy"})
            return httpx.Response(200, content=b"model")

        async def main():
            t = self.make(handler)
            assert await t.fetch("model-centric/get-model", {"model_id": 1}) == b"model"

        asyncio.run(main())
        assert calls == ["/model-centric/get-model"] * 3

    def test_non_idempotent_not_retried_on_503(self):
        calls = []

        def handler(request):
            calls.append(1)
            return httpx.Response(503, json={"error": "busy"})

        async def main():
            with pytest.raises(UnavailableError, match="busy"):
                await self.make(handler).call("model-centric/report", {}, idempotent=False)

        asyncio.run(main())
        assert len(calls) == 1

    def test_status_maps_to_error_class(self):
        def handler(request):
            return httpx.Response(404, json={"error": "Plan ID not found!"})

        async def main():
            with pytest.raises(NotFoundError, match="Plan ID not found!"):
                await self.make(handler).fetch("model-centric/get-plan", {})

        asyncio.run(main())

    def test_envelope_unwrapped(self):
        def handler(request):
            return httpx.Response(200, json={"type": "model-centric/report",
                                              "data": {"status": "success"}})

        async def main():
            assert await self.make(handler).call("model-centric/report", {}) == \
                {"status": "success"}

        asyncio.run(main())

    def test_connect_error_retried_even_if_not_idempotent(self):
        calls = []

        def handler(request):
            calls.append(1)
            if len(calls) == 1:
                raise httpx.ConnectError("refused")
            return httpx.Response(200, json={"status": "success"})

        async def main():
            assert await self.make(handler).call("model-centric/report", {},
                                                 idempotent=False) == {"status": "success"}

        asyncio.run(main())
        assert len(calls) == 2
