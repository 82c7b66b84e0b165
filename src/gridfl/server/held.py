"""Requests the node holds until something happens: cycle requests with ``wait`` (until a
cycle opens) and status requests with ``wait`` (until a cycle closes).

:class:`CycleSignal` wakes them when a cycle opens or closes or a process stops running,
here or (through the watcher and listener in :mod:`gridfl.server.background`) in another
server process on the same database; :class:`HeldAdmissions` answers the woken cycle
requests together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio

from gridfl import _messages
from gridfl.server.service import GridNode


class CycleSignal:
    """Wakes held requests (cycle requests, status) when a cycle opens or closes or a
    process stops running.

    ``notify`` runs on the event loop (the node calls it from worker threads through
    ``call_soon_threadsafe``); waiters compare generations, so a wake-up between their
    check and their wait is never lost.
    """

    def __init__(self) -> None:
        self.generation = 0
        #: the server is shutting down: nothing waits any more
        self.closed = False
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self.notify()

    async def wait_after(self, generation: int, timeout: float) -> None:
        if self.closed or self.generation != generation:
            return
        with anyio.move_on_after(timeout):
            await self._event.wait()


class Batches:
    """Runs requests that arrive together in batches: up to ``batch`` of the ones queued
    over the same few loop turns go to ``run`` in one thread call (and one write
    transaction) instead of a thread hand-off and a transaction each. ``run`` returns one
    reply or exception per request, in order.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], batch: int = 64) -> None:
        self.run = run
        self.batch = batch
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def submit(self, req: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((req, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            # the waiters one signal woke resume over the next loop turns: let them queue
            for _ in range(3):
                await asyncio.sleep(0)
            while self._queue:
                batch, self._queue = self._queue[: self.batch], self._queue[self.batch :]
                reqs = [req for req, _ in batch]
                try:
                    results = await anyio.to_thread.run_sync(self.run, reqs)
                except Exception as e:  # noqa: BLE001 - the transaction failed: all of them
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its connection went away meanwhile
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drainer = None


class HeldAdmissions(Batches):
    """Answers the cycle requests held by :func:`dispatch` in batches: when a cycle opens,
    every worker waiting for it asks at once, and one thread call admits up to
    ``batch`` of them in one write transaction (:meth:`GridNode.admit_held`).
    """

    def __init__(self, node: GridNode, batch: int = 64) -> None:
        super().__init__(node.admit_held, batch)

    async def admit(self, req: _messages.CycleRequest) -> dict[str, Any]:
        return await self.submit(req)


async def hold_status(app, name: str, version: str | None, after: int | None, wait: float):
    """Return once a cycle newer than ``after`` (default: the newest closed one now) has
    closed, the process is no longer running, or ``wait`` seconds pass. The node's cycle
    signal wakes the holder, so a watcher need not poll."""
    node: GridNode = app.state.node
    signal: CycleSignal = app.state.cycle_signal
    deadline = time.monotonic() + wait
    while True:
        generation = signal.generation
        status, newest = await anyio.to_thread.run_sync(node.progress, name, version)
        after = newest if after is None else after
        remaining = deadline - time.monotonic()
        if newest > after or status != "running" or remaining <= 0 or signal.closed:
            return
        await signal.wait_after(generation, remaining)
