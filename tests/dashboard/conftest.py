"""The dashboard's fixtures: a live node (uvicorn on loopback, SQLite) with the test admin
token, a driver that closes real cycles on it, and Playwright's browser on Debian's
Chromium (scripts/ensure-chromium installs it; Playwright downloads no browser here)."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.builders import linear_params
from tests.harness import HttpWorker, LiveNode, join, make_settings, report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# a live page asks for news at most every 4 s (static/app.js MIN_INTERVAL_MS), and this
# machine is shared: give each expectation room for a few of those
expect.set_options(timeout=15_000)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's launch arguments, on the system Chromium."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM}


# pytest-playwright keeps one Playwright for the whole session, and Playwright's sync API
# leaves an event loop running in the main thread while it lives: every later test that
# calls asyncio.run() (the load tests, the deadline timer's) would then fail. Here
# Playwright and its browser live for one test module.
@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser_context_args():
    """A plain desktop context (the tests set their own viewport where it matters)."""
    return {}


@pytest.fixture(scope="module")
def browser_type(playwright, browser_name):
    return getattr(playwright, browser_name)


@pytest.fixture(scope="module")
def browser(browser_type, browser_type_launch_args):
    browser = browser_type.launch(**browser_type_launch_args)
    yield browser
    browser.close()


class CycleDriver:
    """Closes cycles of a hosted process (``max_diffs`` 1) by hand: one worker joins with
    speed-test figures and reports a zero diff with the metrics given."""

    def __init__(self, node: LiveNode, name: str) -> None:
        self.node, self.name = node, name
        self.worker = HttpWorker(node.url)
        self.shapes = [p.shape for p in linear_params()]
        self.lock = threading.Lock()

    def close_cycle(self, **metrics: float) -> None:
        with self.lock:
            wid, cyc = join(self.worker, self.name, "1.0", ping=4.0, download=90.0, upload=30.0)
            assert cyc["status"] == "accepted", cyc
            diff = [np.zeros(s, np.float32) for s in self.shapes]
            st, body = report(self.worker, wid, cyc["request_key"], diff, metrics=metrics)
            assert st == 200, body

    def close(self) -> None:
        self.worker.close()


@pytest.fixture
def live(tmp_path):
    node = LiveNode(make_settings(None, tmp_path))
    yield node
    node.stop()


@pytest.fixture
def driven(live):
    """(node, process name, driver): a process hosted with ``max_diffs`` 1."""
    name = live.host(server_config={"max_diffs": 1, "cycle_length": 600})
    driver = CycleDriver(live, name)
    yield live, name, driver
    driver.close()
