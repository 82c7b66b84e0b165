"""What an open dashboard costs a training run: the 2NN demo (K = 100, C = 0.1, 10 worker
processes) with the process page open in headless Chromium, against the same run with no
page, in one run.

One demo runs ``--blocks`` blocks of ``--block`` cycles after a warm-up; the page is open
in every other block (opened and signed in at the block's first cycle, closed at its
last), so both conditions share the same node, workers, machine load and point in
training. The first cycle of each block is left out (the page opening or closing). It
prints the median seconds per cycle with and without the page and their ratio; the goal
is under 5 % apart. The page follows every cycle through its held status request.

The machine is shared, so its load drifts during a run: short blocks, alternated often,
put both conditions under the same drift. Beside the pooled medians it prints the paired
ratio: each page block's median against the mean of its two neighbours' (no page), the
median over the pairs, which a slow drift does not bias. It also prints the CPU time the
demo's own processes (node and workers) spend per cycle with and without the page, and
Chromium's: what the page adds to the demo's work, which the machine's other load bends
far less than it bends seconds.

    python -m benchmarks.bench_dashboard [--block 5] [--blocks 17]
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import tempfile
import threading
from pathlib import Path


def descendants_cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process's descendants (Linux /proc): Chromium's
    processes, and the others (the demo's node and workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            rest = stat[stat.rindex(")") + 2 :].split()
            procs[int(entry)] = (int(rest[1]), comm, (int(rest[11]) + int(rest[12])) / tick)
    mine, grew = {os.getpid()}, True
    while grew:
        found = {pid for pid, (parent, _, _) in procs.items() if parent in mine} - mine
        mine |= found
        grew = bool(found)
    mine.discard(os.getpid())
    chromium = sum(cpu for pid, (_, comm, cpu) in procs.items()
                   if pid in mine and comm.startswith("chrom"))
    return chromium, sum(procs[pid][2] for pid in mine if pid in procs) - chromium


def chromium_cpu_seconds() -> float:
    return descendants_cpu_seconds()[0]


class PageThread:
    """Headless Chromium in a thread of its own (Playwright's sync API is per thread):
    ``open(url, token)`` signs in and opens the process page, ``close()`` closes it."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.commands: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.charted = 0  # cycles on the page's loss chart when it last closed
        self.cpu_open = 0.0  # CPU seconds of Chromium's processes while the page was open
        self.cycles_open = 0  # cycles closed while it was open
        self.cpu_at_open = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"))
            page = None
            while True:
                cmd, args = self.commands.get()
                if cmd == "open":
                    url, token = args
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.goto(url)
                    page.get_by_label("Admin token").fill(token)
                    page.keyboard.press("Enter")
                    page.goto(f"{url}#/process/{self.process}/1")
                    page.get_by_role("heading", name="Cycles").wait_for()
                    self.cpu_at_open = chromium_cpu_seconds()
                elif cmd == "close" and page is not None:
                    charted = page.locator('figure[data-chart="Loss"]').get_attribute(
                        "data-points"
                    )
                    self.charted = int(charted or 0)
                    self.cpu_open += chromium_cpu_seconds() - self.cpu_at_open
                    page.close()
                    page = None
                elif cmd == "quit":
                    browser.close()
                    self.done.put(None)
                    return
                self.done.put(None)

    def cpu_ms_per_cycle(self) -> float:
        return 1000 * self.cpu_open / max(1, self.cycles_open)

    def call(self, cmd: str, *args) -> None:
        self.commands.put((cmd, args))
        self.done.get(timeout=120)


def main(argv: list[str]) -> None:
    from gridfl.demo.run import DemoOptions, run_demo

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--block", type=int, default=5, help="cycles per block")
    ap.add_argument("--blocks", type=int, default=17,
                    help="blocks, odd: the page is open in every other, each between two without")
    ap.add_argument("--warmup", type=int, default=3, help="cycles before the first block")
    args = ap.parse_args(argv)
    if shutil.which("chromium") is None:
        raise SystemExit("bench_dashboard needs Chromium (scripts/ensure-chromium)")

    total = args.warmup + args.block * args.blocks
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    options = DemoOptions(model="2nn", cycles=total, target=None, data_dir=tmp / "data",
                          out_dir=tmp / "out")
    page = PageThread("mnist-2nn")
    where: dict[str, str] = {}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    blocks: dict[int, list[float]] = {}
    # the demo's CPU (node and workers) per cycle: less bent by the machine's other load
    # than seconds are, so it shows what the page adds to the demo's own work
    demo_cpu: dict[bool, list[float]] = {True: [], False: []}
    cpu_before = [0.0]

    def page_open(block: int) -> bool:
        return block % 2 == 1

    def on_dashboard(url: str, token_file: Path) -> None:
        where["url"], where["token"] = url, token_file.read_text().strip()

    def on_cycle(c) -> None:
        cpu = descendants_cpu_seconds()[1]
        used, cpu_before[0] = cpu - cpu_before[0], cpu
        i = c.cycle - args.warmup  # cycles numbered from 1; block k holds i in [k*B+1, ..]
        if i < 1:
            if i == 0 and page_open(0):
                page.call("open", where["url"], where["token"])
            return
        block, at = divmod(i - 1, args.block)
        if page_open(block):  # closed while the page was open
            page.cycles_open += 1
        if at > 0:  # the first cycle of a block saw the page open or close
            seconds[page_open(block)].append(c.seconds)
            demo_cpu[page_open(block)].append(used)
            blocks.setdefault(block, []).append(c.seconds)
        if at == args.block - 1 and block + 1 < args.blocks:  # the next block's state
            if page_open(block + 1):
                page.call("open", where["url"], where["token"])
            else:
                page.call("close")

    result = run_demo(options, on_cycle=on_cycle, on_dashboard=on_dashboard)
    page.call("close")
    page.call("quit")
    without, with_page = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"2NN demo, {len(result.cycles)} cycles, blocks of {args.block} "
          f"(page open in every other):")
    print(f"  s/cycle without a page: median {without:.3f} over {len(seconds[False])} cycles")
    print(f"  s/cycle with the page:  median {with_page:.3f} over {len(seconds[True])} cycles")
    print(f"  with / without: {with_page / without:.3f} (goal: within 5 %); the page's chart "
          f"held {page.charted} cycles when it last closed")
    medians = {b: statistics.median(v) for b, v in blocks.items()}
    paired = [medians[b] / ((medians[b - 1] + medians[b + 1]) / 2)
              for b in medians if page_open(b) and b - 1 in medians and b + 1 in medians]
    print(f"  paired: median of {len(paired)} page blocks against their neighbours: "
          f"{statistics.median(paired):.3f} (goal: within 5 %)")
    print("  median s/cycle per block (the spread is the machine's noise): " + ", ".join(
        f"{statistics.median(v):.3f}{' (page)' if page_open(b) else ''}"
        for b, v in sorted(blocks.items())))
    print(f"  Chromium's CPU while the page was open: {page.cpu_ms_per_cycle():.1f} ms per cycle")
    cpu_without = 1000 * statistics.median(demo_cpu[False])
    cpu_with = 1000 * statistics.median(demo_cpu[True])
    added = cpu_with - cpu_without + page.cpu_ms_per_cycle()
    print(f"  the demo's CPU (node and workers) per cycle: median {cpu_without:.0f} ms without "
          f"a page, {cpu_with:.0f} ms with; with Chromium's, the page adds "
          f"{added / cpu_without:+.1%} of the demo's CPU per cycle")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
