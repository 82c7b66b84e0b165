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
    #: reports read and folded at once; later ones wait (TCP backpressure), so server
    #: memory stays O(model x this), not O(model x concurrent uploads)
    max_concurrent_reports: int = 4
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
    #: third-party auth endpoint timeout (seconds)
    auth_endpoint_timeout: float = 10.0

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        env = os.environ.get("GRIDFL_DATABASE_URL")
        if env:
            return env
        return f"sqlite:///{(Path(self.data_dir) / 'gridfl.db').resolve()}"
