"""The deadline timer hears a cycle that opens while it reads the next deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("starlette")

from gridfl.server.background import deadline_timer
from gridfl.server.settings import Settings


class _OpensWhileRead:
    """A node whose first ``next_deadline`` read races a cycle opening: the cycle's
    ``on_cycles_changed`` wake-up lands after the read saw no cycle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self.loop, self.wake = loop, wake
        self.deadline: float | None = None
        self.closes: list[float] = []

    def close_due_cycles(self) -> int:
        self.closes.append(time.monotonic())
        return 0

    def next_deadline(self) -> float | None:
        seen = self.deadline
        if not self.closes[1:]:  # the first read: a cycle opens right after it looked
            self.deadline = time.time() + 0.2
            self.loop.call_soon_threadsafe(self.wake.set)
            time.sleep(0.05)  # the wake-up is delivered before the timer goes on
        return seen


def test_a_cycle_opened_during_the_read_is_timed():
    async def run() -> list[float]:
        wake = asyncio.Event()
        node = _OpensWhileRead(asyncio.get_running_loop(), wake)
        timer = asyncio.create_task(
            deadline_timer(node, Settings(timer_max_sleep=30.0), wake)  # type: ignore[arg-type]
        )
        await asyncio.sleep(2.0)
        timer.cancel()
        return node.closes

    closes = asyncio.run(run())
    # woken at once by the opening, then again at the 0.2 s deadline, not 30 s later
    assert len(closes) >= 3, closes
    assert closes[2] - closes[0] < 1.5, closes
