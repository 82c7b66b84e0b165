"""The dashboard following a real ``gridfl demo`` run (the CLI in a process of its own:
node, worker processes, compiled plans), in Debian's Chromium: the URL and token file it
prints sign in, its process appears, and the accuracy chart and the federated evaluation
gain points as cycles close."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect

from tests.harness import Demo

pytestmark = pytest.mark.browser

# the line `gridfl demo` prints once its node is up
DASHBOARD_LINE = r"dashboard: (http://\S+/dashboard/) .*admin token in (\S+)\)"


@pytest.fixture
def demo(tmp_path):
    """(dashboard URL, admin token) of a 2NN demo with federated evaluation, long enough
    to outlast the test on a fast machine (its node stops with it)."""
    pytest.importorskip("torch")  # the demo compiles its plans on the host
    run = Demo(["--model", "2nn", "-K", "4", "-C", "0.5", "--workers", "2",
                "--examples-per-client", "300", "--cycles", "1000", "--target", "1",
                "--federated-every", "1", "--data-dir", str(tmp_path / "data"),
                "--out-dir", str(tmp_path / "out")])
    try:
        url, token_file = run.wait_for(DASHBOARD_LINE).groups()
        with open(token_file) as f:
            yield url, f.read().strip()
        assert run.proc.poll() is None, "the demo ended during the test:\n" + run.output
    finally:
        run.stop()


def _points(page: Page, chart: str) -> int:
    return int(page.locator(f'figure[data-chart="{chart}"]').get_attribute("data-points") or 0)


def test_a_live_demo_appears_and_its_charts_grow(page: Page, demo):
    url, token = demo
    page.goto(url)
    page.get_by_label("Admin token").fill(token)
    page.keyboard.press("Enter")
    link = page.get_by_role("link", name="mnist-2nn")
    expect(link).to_be_visible(timeout=60_000)  # hosted once its plans are compiled
    link.click()
    accuracy = page.locator('figure[data-chart="Accuracy"]')
    expect(accuracy).to_have_attribute("data-points", re.compile(r"[1-9]"), timeout=60_000)
    before = _points(page, "Accuracy")
    # a cycle closes, and the open page gains its point through the held request
    deadline = time.monotonic() + 30
    while _points(page, "Accuracy") <= before and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert _points(page, "Accuracy") > before
    table = page.get_by_role("region", name="Cycles, newest first (50 shown)")
    expect(table.get_by_role("columnheader")).to_have_text(
        ["Cycle", "Status", "Start", "End", "Duration", "Accepted", "Reported", "Rejected",
         "Expired"])
    # the workers evaluate checkpoints too: their metrics are charted per checkpoint
    evaluated = page.locator('figure[data-chart="Federated evaluation"]')
    expect(evaluated).to_have_attribute("data-points", re.compile(r"[1-9]"), timeout=60_000)
    expect(evaluated).to_have_attribute("aria-label", re.compile(r"at checkpoint \d+: .*acc"))
    rows = page.get_by_role("region", name="Federated evaluations, newest first")
    expect(rows.locator("tbody tr").first).to_be_visible()
