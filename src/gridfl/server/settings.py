"""Settings of one grid node process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


@dataclass
class Settings:
    """Everything a grid node needs; ``gridfl serve`` builds one from its options.

    ``database_url`` defaults to an SQLite file ``gridfl.db`` in ``data_dir``.
    ``admin_token`` None disables the admin API (every admin call answers 403).
    """

    data_dir: Path = field(default_factory=lambda: Path("data"))
    database_url: str | None = None
    admin_token: str | None = None
    #: largest worker request body (JSON over HTTP, one WebSocket frame); a CNN report is ~9 MB
    max_body_bytes: int = 64 * MiB
    #: largest admin (host) request body
    max_admin_body_bytes: int = 1024 * MiB
    #: reports folded at once (a slot is taken once the body has arrived); later ones
    #: wait, so folding memory stays O(model x this), not O(model x concurrent uploads)
    max_concurrent_reports: int = 4
    #: worker request bodies (HTTP) and messages (WebSocket) held in memory at once, all
    #: connections together (at least ``max_body_bytes``): a reader waits for room, up to
    #: ``read_idle_timeout``, then is answered 503. A body of declared length takes its
    #: whole room before it is read (partial bodies could otherwise wait on each other);
    #: a chunked one as it arrives. Default: the 4 x 64 MiB the report slots once held.
    body_buffer_bytes: int = 256 * MiB
    #: longest silence while a body arrives (then 408), and on a WebSocket after a keepalive
    #: ping (then close 1011): a stalled client costs only its own connection. A slow link
    #: still sends bytes every few seconds; 60 s also rides out TCP's retransmission back-off
    #: after a ~30 s radio outage (nginx's client_body_timeout is 60 s too)
    read_idle_timeout: float = 60.0
    #: seconds between keepalive pings on a WebSocket (a peer stalled mid-frame is closed
    #: within this + ``read_idle_timeout``)
    ws_ping_interval: float = 20.0
    #: an HTTP request's head (request line + headers) must end within this many seconds
    #: of the connection opening or of its first byte (then 408, or a quiet close if the
    #: connection sent nothing)
    head_timeout: float = 30.0
    #: largest HTTP request head (request line + headers; nginx allows 32 KiB, Node 16 KiB)
    max_head_bytes: int = 32 * 1024
    #: most headers in one HTTP request (Apache's default; clients send ~10-20)
    max_headers: int = 100
    #: size of the speed-test download (PyGrid sends 64 MiB)
    speed_test_bytes: int = 64 * MiB
    #: rejection ``timeout`` when the open cycle has no deadline (cycle_length null)
    retry_seconds: int = 60
    #: longest sleep of the deadline timer between checks (it also wakes on new cycles)
    timer_max_sleep: float = 30.0
    #: how often this process looks in the database for a cycle opened (or closed) by
    #: another server process, to wake its long-polled cycle requests and deadline timer
    #: (one query per period per process; cycles opened here wake them at once)
    long_poll_recheck: float = 1.0
    #: durability "cycle" with several server processes: how long a ready cycle waits for
    #: the other processes' partial sums before it expires and reopens (docs/scaling.md)
    close_timeout: float = 10.0
    #: third-party auth endpoint timeout (seconds)
    auth_endpoint_timeout: float = 10.0
    #: TEST-ONLY fault injection, never set in production: ``"report"`` or ``"aggregate"``
    #: makes the process exit abruptly at that point inside the transaction (see
    #: ``gridfl.server.cycles.Cycles.crash_point``); ``gridfl serve`` takes it from the
    #: environment variable ``GRIDFL_TEST_CRASH_AT``
    test_crash_at: str | None = None

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        env = os.environ.get("GRIDFL_DATABASE_URL")
        if env:
            return env
        return f"sqlite:///{(Path(self.data_dir) / 'gridfl.db').resolve()}"
