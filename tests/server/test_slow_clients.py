"""Clients that stall or flood the transport cost only their own connection: stalled
report uploads (HTTP bodies, WebSocket frames) hold no report slot and are given up after
``read_idle_timeout``; request heads are bounded (size, header count); a text frame that
is not UTF-8 closes its socket quietly. Real servers on loopback, raw sockets."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import threading
import time

import pytest

from gridfl import state
from tests.builders import diff_of, host_payload
from tests.harness import Admin, HttpWorker, Serve, WsWorker, join, report

IDLE = 10.0  # read_idle_timeout of these servers: far above a report's time on loopback


@pytest.fixture
def node(tmp_path, sqlite_url):
    """``gridfl serve`` in a subprocess, with its defaults (its log in ``node.log``)."""
    served = Serve(sqlite_url, tmp_path)
    yield served
    served.stop()


def _report_body(worker, name="mnist") -> tuple[bytes, str]:
    """A valid report of a worker that joined: (JSON body, worker_id)."""
    wid, cyc = join(worker)
    data = {"worker_id": wid, "request_key": cyc["request_key"],
            "diff": base64.b64encode(state.dumps(diff_of(0))).decode()}
    return json.dumps(data).encode(), wid


def _http_head(port: int, body_len: int) -> bytes:
    return (f"POST /model-centric/report HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n").encode()


def _ws_open(port: int) -> socket.socket:
    """A raw WebSocket, handshake done."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _ws_frame_head(length: int, opcode: int = 1) -> tuple[bytes, bytes]:
    """A masked client frame's head for ``length`` payload bytes, and its mask key."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length) + mask, mask


def _masked(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))


def _read_all(s: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _received_so_far(s: socket.socket) -> bytes:
    """What the node has sent on ``s`` until now, without waiting for more."""
    try:
        return s.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def _ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked server frames in ``data``."""
    frames = []
    while len(data) >= 2:
        n, at = data[1] & 0x7F, 2
        if n == 126:
            n, at = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((data[0] & 0x0F, data[at:at + n]))
        data = data[at + n:]
    return frames


def _closed_with(data: bytes, code: int) -> bool:
    return any(op == 8 and struct.unpack("!H", p[:2])[0] == code for op, p in _ws_frames(data))


def test_stalled_uploads_do_not_block_other_reports(server_factory):
    """15 HTTP reports stalled after their headers and 15 body bytes, and 5 WebSocket report
    frames stalled after 15 payload bytes (more than the 4 report slots): a legitimate
    worker on each transport reports at once; the stalled ones are answered 408 (HTTP) or
    closed 1011 (WebSocket) once silent for read_idle_timeout, and store nothing."""
    srv = server_factory(read_idle_timeout=IDLE, ws_ping_interval=1.0)
    port = srv.port
    admin = Admin(srv.url)
    cfg = {"max_workers": 30, "max_diffs": 30, "num_cycles": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201

    joined = HttpWorker(srv.url)
    http_stalled, ws_stalled = [], []
    for i in range(20):
        body, _ = _report_body(joined)
        if i < 15:
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(_http_head(port, len(body)) + body[:15])
            http_stalled.append(s)
        else:
            s = _ws_open(port)
            frame = json.dumps({"type": "model-centric/report", "request_id": str(i),
                                "data": json.loads(body)}).encode()
            head, mask = _ws_frame_head(len(frame))
            s.sendall(head + _masked(frame[:15], mask))
            ws_stalled.append(s)

    for worker in (HttpWorker(srv.url), WsWorker(srv.url, srv.ws_url)):
        wid, cyc = join(worker)
        status, reply = report(worker, wid, cyc["request_key"], diff_of(1))
        assert status == 200, reply
        worker.close()
    # answered while every stalled upload was still waiting (IDLE s of margin); a stalled
    # WebSocket may have had keepalive pings by now (every second), which answer nothing
    readable, _, _ = select.select(http_stalled, [], [], 0)
    assert not readable, "a stalled HTTP upload was answered before the legitimate reports"
    early = {s: _received_so_far(s) for s in ws_stalled}
    assert all(op == 9 for data in early.values() for op, _ in _ws_frames(data)), (
        "a stalled WebSocket upload was answered before the legitimate reports")
    assert admin.status()["current"]["reported"] == 2

    for s in http_stalled:
        answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"stopped arriving" in answer
    for s in ws_stalled:
        answer = early[s] + _read_all(s)  # keepalive pings, then the close
        assert _closed_with(answer, 1011), _ws_frames(answer)
    assert admin.status()["current"]["reported"] == 2  # nothing of the stalled ones
    for s in http_stalled + ws_stalled:
        s.close()
    joined.close()


def test_slow_but_progressing_uploads_succeed(server_factory):
    """A report trickled in over twice read_idle_timeout (HTTP body; WebSocket frame, which
    also outlasts several unanswered keepalive pings) is taken."""
    idle = 1.5
    srv = server_factory(read_idle_timeout=idle, ws_ping_interval=0.3)
    port = srv.port
    admin = Admin(srv.url)
    cfg = {"max_workers": 5, "max_diffs": 5, "num_cycles": 1, "cycle_length": 600}
    assert admin.host(host_payload(server_config=cfg)).status_code == 201
    joined = HttpWorker(srv.url)
    steps = 12  # one piece every idle / 4 s: 3 x idle in all

    body, _ = _report_body(joined)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(_http_head(port, len(body)))
    for i in range(steps):
        time.sleep(idle / 4)
        s.sendall(body[i * len(body) // steps:(i + 1) * len(body) // steps])
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    s.close()

    body, _ = _report_body(joined)
    frame = json.dumps({"type": "model-centric/report", "request_id": "slow",
                        "data": json.loads(body)}).encode()
    s = _ws_open(port)
    head, mask = _ws_frame_head(len(frame))
    s.sendall(head)
    for i in range(steps):
        time.sleep(idle / 4)
        lo, hi = i * len(frame) // steps, (i + 1) * len(frame) // steps
        s.sendall(_masked(frame[lo:hi], mask, lo))
    got = b""
    while not any(op == 1 for op, _ in _ws_frames(got)):
        chunk = s.recv(65536)
        assert chunk, f"closed: {_ws_frames(got)}"
        got += chunk
    reply = json.loads(next(p for op, p in _ws_frames(got) if op == 1))
    assert reply["request_id"] == "slow" and "error" not in reply["data"], reply
    s.close()
    assert admin.status()["current"]["reported"] == 2
    joined.close()


# --------------------------------------------------------------------------- request heads
def _send(port: int, chunks) -> bytes:
    """Send ``chunks`` (until the node stops reading) and return what it answered before
    closing (b"" if the close was a reset that dropped the answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)

    def pump():
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:  # the node closed the connection: the point
            pass

    sender = threading.Thread(target=pump)
    sender.start()
    answer = _read_all(s)
    s.close()
    sender.join(timeout=60)
    return answer


def _request(port: int, headers: bytes = b"") -> bytes:
    return (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port) + headers


def test_header_floods_are_refused_and_leave_no_memory_behind(node):
    """A 16 MB header line, 250k small headers, a 300 MB header and 101 headers are
    refused (431) by a ``gridfl serve`` process, whose memory does not stay raised."""
    port = node.port
    ok = _send(port, [_request(port, b"Connection: close\r\n\r\n")])
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    rss_before = node.rss_mb()

    # small enough to be read whole: the 431 itself arrives
    answer = _send(port, [_request(port, b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n")])
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    answer = _send(port, [_request(port, b"".join(b"X-%d: 1\r\n" % i for i in range(101))
                                   + b"\r\n")])
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"more than 100 headers" in answer

    mib = b"a" * (1 << 20)
    floods = {
        "a 16 MB header line": [_request(port, b"X-Big: "), *[mib] * 16, b"\r\n\r\n"],
        "250k small headers": [_request(port), *[b"X: y\r\n" * 10_000] * 25, b"\r\n"],
        "a 300 MB header": [_request(port, b"X-Big: "), *[mib] * 300, b"\r\n\r\n"],
    }
    for what, chunks in floods.items():
        answer = _send(port, chunks)
        # the node may close with unread bytes pending (a reset drops its answer)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), (what, answer[:200])
    ok = _send(port, [_request(port, b"Connection: close\r\n\r\n")])
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert node.rss_mb() < rss_before + 30, (rss_before, node.rss_mb())


def test_head_that_never_ends_is_given_up(server_factory):
    """A head sent a byte at a time and never finished is answered 408 after
    head_timeout; a connection that sends nothing is closed."""
    srv = server_factory(head_timeout=1.0)
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    slow.sendall(_request(srv.port, b"X-Slow: a"))
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    answer = _read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert _read_all(silent) == b""
    slow.close()
    silent.close()


def test_text_frame_not_utf8_closes_quietly(node):
    """Invalid UTF-8 in a text frame: close 1007, and no ERROR nor traceback in the log."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(node.ws_url, open_timeout=20) as ws:
        ws.send(b'{"type": "\xff\xfe"}', text=True)
        try:
            ws.recv(timeout=20)
            raise AssertionError("the socket stayed open")
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 1007, e
    ok = _send(node.port, [_request(node.port, b"Connection: close\r\n\r\n")])
    assert ok.startswith(b"HTTP/1.1 200")
    node.stop()
    log = node.log.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log


def test_body_budget_waits_for_room_then_gives_up():
    """Bodies take room as they arrive: a reader waits for room freed by another, and
    fails with a 503 (giving back nothing it did not get) when none comes in time."""
    import anyio

    from gridfl._exceptions import UnavailableError
    from gridfl.server.bodies import BodyBudget

    async def main():
        budget = BodyBudget(100, timeout=30)
        await budget.take(80)
        got = anyio.Event()

        async def second():
            await budget.take(30)
            got.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.05)
            assert not got.is_set() and budget.used == 80
            budget.give(80)
            await got.wait()
        assert budget.used == 30

        budget.timeout = 0.1
        try:
            await budget.take(71)
            raise AssertionError("took more room than there is")
        except UnavailableError as e:
            assert e.http_status == 503
        assert budget.used == 30

    anyio.run(main)
