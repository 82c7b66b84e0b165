"""The load benchmark at CI size (benchmarks/bench_server.py has the full sizes): 200
concurrent workers (HTTP and WebSocket) against one ``gridfl serve`` process on its
default embedded SQLite, tiny model, five cycles. No errors, every report counted once,
and the server's memory flat across cycles (the aggregate is folded in, O(model)).

Memory is the server's RSS, sampled about every 0.1 s; per cycle the test keeps its floor
(the lowest sample: in-flight requests and the page caches of the SQLite connections open
at that moment are transient). Cycle 1 is warm-up (the threadpool's 40 threads, glibc's
per-thread arenas, the connection pool); the floor while the last cycle runs may exceed the
floor while cycle 2 runs by less than ``LEAK_BOUND_MB``. Three cycles (120 reports) lie
between the two. Without a leak the growth measured 2-4 MB; with a leak injected into the
node's report handler, 64 KB and 50 KB kept per report failed the test (+12 and +9 MB),
32 KB did not (+6 MB). So it catches state of roughly 50 KB or more per report, or ~3 MB
or more per cycle; with this tiny model a leak of a few KB per report, or of one model per
cycle, goes unseen.

The server runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at glibc's default (128 KiB). Left
dynamic, glibc raises the threshold to the size of the largest mmapped block freed, here a
SQLite connection's first page-cache block (20 pages of 64 KiB, ~1.3 MB); from then on the
page caches of the pool's overflow connections, opened and closed as concurrency rises and
falls, are carved out of the threads' arenas, whose free space grows cycle after cycle
while the memory in use stays flat. Measured: the floor above grew 12-20 MB from cycle 2 to
cycle 5, RSS 78 MB over 80 cycles (levelling off), with malloc's bytes in use at 41-45 MB
and Python's allocated blocks flat throughout. That is fragmentation, not state the node
keeps, and it made this test flaky; with the threshold fixed the floor grows ~0.4 MB a
cycle (20 cycles measured).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests._swarm import check_counted_once, run_swarm
from tests.builders import ADMIN, host_payload
from tests.harness import Serve

SHAPES = [(4, 3), (3,)]
N_WORKERS, PER_CYCLE, CYCLES = 200, 40, 5
LEAK_BOUND_MB = 8
# glibc's default; fixed, it is no longer raised to the size of the largest block freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def test_200_workers_one_sqlite_node(tmp_path):
    srv = Serve(f"sqlite:///{tmp_path / 'grid.db'}", tmp_path, env=MALLOC_ENV)
    try:
        admin = httpx.Client(base_url=srv.url, timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        sc = {"max_workers": PER_CYCLE, "max_diffs": PER_CYCLE, "num_cycles": CYCLES,
              "cycle_length": 300}
        assert admin.post("/gridfl/v1/processes",
                          json=host_payload(server_config=sc)).status_code == 201
        # the server's RSS floor while cycle k + 1 runs (k cycles completed)
        floor: dict[int, float] = {}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                done = sum(c["status"] == "completed"
                           for c in admin.get("/gridfl/v1/processes/mnist/1.0").json()["cycles"])
                rss = srv.rss_mb()
                floor[done] = min(floor.get(done, rss), rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = srv.cpu_s()
        res = asyncio.run(run_swarm([srv.url], N_WORKERS, "mnist", "1.0", SHAPES,
                                    wait=30, deadline=300))
        cpu = srv.cpu_s() - cpu0
        stop.set()
        sampler.join()
        assert res.errors == []

        st = admin.get("/gridfl/v1/processes/mnist/1.0").json()
        assert st["status"] == "finished"
        assert [(c["status"], c["accepted"], c["reported"]) for c in st["cycles"]] == [
            ("completed", PER_CYCLE, PER_CYCLE)
        ] * CYCLES
        assert len(res.reports) == PER_CYCLE * CYCLES
        ckpts = [admin.get(f"/gridfl/v1/processes/mnist/1.0/checkpoints/{k}").content
                 for k in range(1, CYCLES + 2)]
        per_cycle = check_counted_once(res, ckpts)
        assert [len(per_cycle[k]) for k in range(CYCLES)] == [PER_CYCLE] * CYCLES
        # memory flat: no state kept per report (see the module docstring)
        floors = {k + 1: round(v, 1) for k, v in sorted(floor.items()) if k < CYCLES}
        print(f"\n{N_WORKERS} workers, {CYCLES} cycles: {res.wall:.1f} s, "
              f"server CPU {1000 * cpu / len(res.reports):.1f} ms/report, "
              f"RSS floor MB per cycle {floors}")
        assert floors[CYCLES] - floors[2] < LEAK_BOUND_MB, floors
    finally:
        srv.stop()
