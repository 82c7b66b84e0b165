"""Remake the dashboard's screenshots in docs/img/ from a real run: a short ``gridfl demo``
(2NN, federated evaluation of every checkpoint) followed in headless Chromium, shot once
a dozen cycles have closed, at 1280 px (with its federated evaluation section on its
own) and at 400 px wide.

    python scripts/dashboard_screenshot.py [--cycles 12]

Needs the demo's extras (torch, to compile the plans) and Debian's Chromium
(scripts/ensure-chromium).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"dashboard: (http://\S+/dashboard/) .*admin token in (\S+)\)")


def start_demo(tmp: Path, cycles: int) -> tuple[subprocess.Popen, str, str]:
    """The demo's process, its dashboard URL and admin token (once its node is up)."""
    cmd = [sys.executable, "-m", "gridfl", "demo", "--model", "2nn", "-K", "20", "-C", "0.2",
           "--workers", "4", "--examples-per-client", "600", "--cycles", str(cycles + 20),
           "--target", "1", "--federated-every", "2", "--data-dir", str(tmp / "data"),
           "--out-dir", str(tmp / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "500", "TERM": "dumb"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := LINE.search(line):
            url, token_file = m.groups()
            return proc, url, Path(token_file).read_text().strip()
    raise SystemExit(f"gridfl demo exited ({proc.wait()}) before printing its dashboard URL")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=12, help="closed cycles in the shot")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/img/dashboard.png")
    ap.add_argument("--evaluation", type=Path,
                    default=ROOT / "docs/img/dashboard-evaluation.png")
    ap.add_argument("--narrow", type=Path, default=ROOT / "docs/img/dashboard-narrow.png")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dashboard-shot-"))
    proc, url, token = start_demo(tmp, args.cycles)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_label("Admin token").fill(token)
            page.keyboard.press("Enter")
            page.get_by_role("link", name="mnist-2nn").click(timeout=120_000)
            chart = page.locator('figure[data-chart="Accuracy"]')
            deadline = time.monotonic() + 300
            while int(chart.get_attribute("data-points") or 0) < args.cycles:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the demo closed too few cycles for the shot")
                page.wait_for_timeout(200)
            evaluated = page.locator('figure[data-chart="Federated evaluation"]')
            evaluated.wait_for(timeout=60_000)
            page.screenshot(path=args.out)
            section = page.locator("h2:text-is('Federated evaluation') + div")
            section.screenshot(path=args.evaluation)
            page.set_viewport_size({"width": 400, "height": 1400})
            page.wait_for_timeout(2500)  # the next live reply fits the charts to the width
            page.screenshot(path=args.narrow)
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)  # the demo stops its node and workers
        proc.wait(timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}, {args.evaluation} and {args.narrow}")


if __name__ == "__main__":
    main(sys.argv[1:])
