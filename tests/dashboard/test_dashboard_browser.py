"""The dashboard in a real browser (Playwright driving Debian's Chromium) against a live
node closing real cycles. Screenshots of failures go to test-results/ (pytest-playwright's
``--screenshot only-on-failure``)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from gridfl import state
from gridfl.server.dashboard import COOKIE
from tests.builders import ADMIN

pytestmark = pytest.mark.browser


def sign_in(page: Page, url: str, token: str = ADMIN) -> None:
    page.goto(f"{url}/dashboard")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_refuses_a_wrong_token_and_signs_out(page: Page, live):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    sign_in(page, live.url, "wrong")
    expect(page.get_by_role("alert")).to_have_text("Wrong admin token.")
    assert not page.context.cookies()
    page.get_by_label("Admin token").fill(ADMIN)
    page.keyboard.press("Enter")  # the form submits from the keyboard
    expect(page.get_by_role("heading", name="Processes")).to_be_visible()
    expect(page.get_by_text("No processes hosted yet")).to_be_visible()  # the empty state
    (cookie,) = page.context.cookies()
    assert cookie["name"] == COOKIE
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["expires"] > 0  # not a browser-session cookie: it expires
    assert page.evaluate("document.cookie") == ""  # no script can read it
    assert all(ADMIN not in u for u in [*requests, page.url])
    # the error state: what went wrong, and a way to try again
    page.goto(f"{live.url}/dashboard/#/process/nope/1")
    expect(page.get_by_role("alert")).to_contain_text("no FL process named 'nope'")
    expect(page.get_by_role("button", name="Try again")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_process_page_follows_live_cycles(page: Page, driven):
    live, name, driver = driven
    driver.close_cycle(loss=0.9, accuracy=0.3)
    sign_in(page, live.url)
    page.get_by_role("link", name=name).click()
    expect(page.get_by_role("heading", name=re.compile(name))).to_be_visible()
    accuracy = page.locator('figure[data-chart="Accuracy"]')
    expect(accuracy).to_have_attribute("data-points", "1")
    expect(accuracy).to_have_attribute("aria-label", re.compile(r"accuracy 0\.3"))
    expect(accuracy.locator("canvas")).to_have_count(1)
    # each closing cycle reaches the open page through its held request
    for i in range(2, 6):
        driver.close_cycle(loss=1 / i, accuracy=i / 10)
        expect(accuracy).to_have_attribute("data-points", str(i))
    expect(accuracy).to_have_attribute("aria-label", re.compile(r"at cycle 5: accuracy 0\.5"))
    expect(page.locator('figure[data-chart="Loss"]')).to_have_attribute("data-points", "5")
    # cycles closing faster than the demo's 0.3 s leave no gaps: every one is charted
    for i in range(6, 31):
        driver.close_cycle(loss=1 / i, accuracy=i / 100, eval_accuracy=i / 200)
        time.sleep(0.1)
    expect(accuracy).to_have_attribute("data-points", "30")
    expect(page.locator('figure[data-chart="Evaluation"]')).to_have_attribute(
        "aria-label", re.compile(r"at cycle 30: eval_accuracy 0\.15")
    )
    rows = page.get_by_role("region", name="Cycles, newest first (50 shown)").locator("tbody tr")
    expect(rows).to_have_count(31)  # thirty closed, one open
    expect(rows.first).to_contain_text("31")
    workers = page.get_by_role("region", name="Workers seen, newest first")
    expect(workers.locator("tbody tr").first).to_contain_text("90")  # its download figure


def test_checkpoint_downloads_equal_the_admin_api(page: Page, driven):
    live, name, driver = driven
    driver.close_cycle(loss=0.5, accuracy=0.5)
    sign_in(page, live.url)
    page.goto(f"{live.url}/dashboard/#/process/{name}/1.0")
    with page.expect_download() as got:
        page.get_by_role("link", name="checkpoint 2 as State bytes").click()
    data = got.value.path().read_bytes()
    assert got.value.suggested_filename.endswith(".state")
    want = live.host_client.retrieve(name, "1.0", 2)
    for a, b in zip(state.loads(data), want, strict=True):
        np.testing.assert_array_equal(a, b)
    with page.expect_download() as got:
        page.get_by_role("link", name="checkpoint 2 as npz").click()
    npz = np.load(got.value.path())
    for i, arr in enumerate(want):
        np.testing.assert_array_equal(npz[f"param_{i}"], arr)


def test_stop_and_delete_ask_first(page: Page, driven):
    live, name, _ = driven
    sign_in(page, live.url)
    page.goto(f"{live.url}/dashboard/#/process/{name}/1.0")
    page.get_by_role("button", name="Stop").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Stop {name} 1.0?")
    page.keyboard.press("Escape")  # cancelled: nothing happens
    expect(dialog).to_be_hidden()
    assert live.status(name)["status"] == "running"
    page.get_by_role("button", name="Stop").click()
    dialog.get_by_role("button", name="Stop").click()
    expect(page.locator(".head .badge")).to_have_text("stopped")
    assert live.status(name)["status"] == "stopped"
    page.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("heading", name="Processes")).to_be_visible()
    expect(page.get_by_text("No processes hosted yet")).to_be_visible()
    assert live.host_client.processes() == []


def test_hostile_name_is_text_narrow_layout_and_keyboard(page: Page, live):
    hostile = "<img src=x onerror=alert(1)>"
    live.host(hostile)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.set_viewport_size({"width": 400, "height": 800})
    sign_in(page, live.url)
    link = page.get_by_role("link", name=hostile)
    expect(link).to_have_text(hostile)
    assert page.locator("main img").count() == 0 and dialogs == []
    no_scroll = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    assert page.evaluate(no_scroll)
    # keyboard only: a new page focuses its heading, Tab reaches the process, Enter opens it
    expect(page.get_by_role("heading", name="Processes")).to_be_focused()
    page.keyboard.press("Tab")  # the table's scrollable region (it scrolls at 400 px)
    expect(page.get_by_role("region", name="Hosted processes")).to_be_focused()
    page.keyboard.press("Tab")
    expect(link).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=re.compile(re.escape(hostile)))).to_be_focused()
    expect(page.get_by_role("heading", name="Cycles")).to_be_visible()  # loaded
    expect(page.get_by_role("heading", name=re.compile(re.escape(hostile)))).to_be_focused()
    assert page.evaluate(no_scroll)
    # the skip link comes first in the tab order and moves the focus to the content
    page.get_by_role("link", name="gridfl").focus()
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    expect(page.get_by_role("heading", name=re.compile(re.escape(hostile)))).to_be_visible()
    page.get_by_role("link", name="Node").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Node")).to_be_focused()
    expect(page.get_by_text("sqlite", exact=True)).to_be_visible()
    assert page.evaluate(no_scroll)


def test_dp_epsilon_is_charted(page: Page, live):
    from tests.dashboard.conftest import CycleDriver

    dp = {"noise_multiplier": 1.0, "clip_norm": 0.5, "population_size": 1000,
          "max_epsilon": 100.0}
    name = live.host(server_config={"max_diffs": 1, "max_workers": 1, "cycle_length": 600,
                                    "differential_privacy": dp})
    driver = CycleDriver(live, name)
    try:
        driver.close_cycle(loss=0.5)
        sign_in(page, live.url)
        page.goto(f"{live.url}/dashboard/#/process/{name}/1.0")
        chart = page.locator('figure[data-chart="Privacy budget ε"]')
        expect(chart).to_have_attribute("data-points", "1")
        driver.close_cycle(loss=0.4)
        expect(chart).to_have_attribute("data-points", "2")
    finally:
        driver.close()
    spent = live.status(name)["privacy"]["epsilon"]
    label = re.compile(f"epsilon {spent:#.3g}")  # 3 significant digits, as toPrecision(3)
    expect(chart).to_have_attribute("aria-label", label)
