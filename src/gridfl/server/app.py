"""The ASGI app: WebSocket at ``/``, worker HTTP under ``/model-centric/``, admin under
``/gridfl/v1/``, the web dashboard under ``/dashboard`` (:mod:`gridfl.server.dashboard`).
This module wires the parts together at startup (:func:`create_app`); the routes are in
:mod:`gridfl.server.routes`, the socket in :mod:`gridfl.server.websocket`, held requests
in :mod:`gridfl.server.held` and the background tasks in :mod:`gridfl.server.background`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from gridfl.server import dashboard
from gridfl.server.background import (
    Answering,
    cycle_listener,
    cycle_watcher,
    deadline_timer,
    release_held,
)
from gridfl.server.bodies import BodyBudget
from gridfl.server.held import Batches, CycleSignal, HeldAdmissions
from gridfl.server.routes import EXCEPTION_HANDLERS, AnswerBugs, routes
from gridfl.server.service import GridNode
from gridfl.server.settings import Settings

__all__ = ["create_app", "release_held"]

log = logging.getLogger("gridfl.server")


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
        if own and n.engine.dialect.name == "sqlite":
            # the one server process on this file: sums held in memory died with the last
            await anyio.to_thread.run_sync(n.cycles.expire_all_lost)
        app.state.report_gate = anyio.Semaphore(max(1, settings.max_concurrent_reports))
        app.state.body_budget = BodyBudget(
            max(settings.body_buffer_bytes, settings.max_body_bytes), settings.read_idle_timeout
        )
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        signal = app.state.cycle_signal = CycleSignal()
        app.state.held_admissions = HeldAdmissions(n)
        app.state.secagg_batches = Batches(n.secure_aggregation_batch, batch=32)
        app.state.ws_answering = Answering()

        def on_cycles_changed() -> None:
            loop.call_soon_threadsafe(wake.set)
            loop.call_soon_threadsafe(signal.notify)

        n.on_cycles_changed = on_cycles_changed
        timer = asyncio.create_task(deadline_timer(n, settings, wake))
        tasks = [timer, asyncio.create_task(cycle_watcher(n, settings, on_cycles_changed))]
        if n.engine.dialect.name == "postgresql":
            listening = asyncio.Event()
            tasks.append(asyncio.create_task(cycle_listener(n, on_cycles_changed, listening)))
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

    app = Starlette(
        routes=[*routes(), *dashboard.routes()],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
            ),
            Middleware(AnswerBugs),
        ],
    )
    app.state.settings = settings
    return app
