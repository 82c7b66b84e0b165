"""The node's background tasks: the deadline timer, the watcher and the PostgreSQL listener
that wake held requests when another server process opens or closes a cycle, and the
shutdown helpers that answer held requests before uvicorn stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import anyio
from starlette.applications import Starlette

from gridfl.server.held import CycleSignal
from gridfl.server.service import CYCLE_CHANNEL, GridNode
from gridfl.server.settings import Settings

log = logging.getLogger("gridfl.server")


async def deadline_timer(node: GridNode, settings: Settings, wake: asyncio.Event) -> None:
    """Close cycles at their deadlines: sleep until the next one or until a cycle opens."""
    while True:
        # cleared before the deadline is read, so that a cycle opened while it is being
        # read still wakes the sleep below (cleared after, that wake-up was lost and the
        # new cycle's deadline waited up to timer_max_sleep)
        wake.clear()
        delay = settings.timer_max_sleep
        try:
            await anyio.to_thread.run_sync(node.close_due_cycles)
            nxt = await anyio.to_thread.run_sync(node.next_deadline)
            if nxt is not None:
                delay = min(delay, max(0.0, nxt - time.time()) + 0.005)
        except Exception:
            log.exception("deadline timer")
        with anyio.move_on_after(delay):
            await wake.wait()


async def cycle_watcher(node: GridNode, settings: Settings, on_change: Callable[[], None]):
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


async def cycle_listener(
    node: GridNode, on_change: Callable[[], None], listening: asyncio.Event
) -> None:
    """PostgreSQL: wake this process's held requests and deadline timer the moment another
    server process on the database opens a cycle or stops a process (``LISTEN`` on
    ``CYCLE_CHANNEL``). Without it they would wait for :func:`cycle_watcher`'s next look,
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
