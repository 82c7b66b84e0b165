"""The load benchmark at CI size (benchmarks/bench_server.py has the full sizes): 200
concurrent workers (HTTP and WebSocket) against one ``gridfl serve`` process on its
default embedded SQLite, tiny model, four cycles. No errors, every report counted once,
and the server's memory flat across cycles (the aggregate is folded in, O(model))."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests._faultkit import Serve
from tests._swarm import check_counted_once, run_swarm
from tests.server.conftest import ADMIN, host_payload

SHAPES = [(4, 3), (3,)]
N_WORKERS, PER_CYCLE, CYCLES = 200, 50, 4


def test_200_workers_one_sqlite_node(tmp_path):
    srv = Serve(f"sqlite:///{tmp_path / 'grid.db'}", tmp_path)
    try:
        admin = httpx.Client(base_url=srv.url, timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        sc = {"max_workers": PER_CYCLE, "max_diffs": PER_CYCLE, "num_cycles": CYCLES,
              "cycle_length": 300}
        assert admin.post("/gridfl/v1/processes",
                          json=host_payload(server_config=sc)).status_code == 201
        # server RSS sampled whenever a cycle completes
        rss: dict[int, float] = {}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                done = sum(c["status"] == "completed"
                           for c in admin.get("/gridfl/v1/processes/mnist/1.0").json()["cycles"])
                rss.setdefault(done, srv.rss_mb())
                time.sleep(0.1)

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
        # memory flat: growth from after cycle 1 to the end is small (no per-report state)
        assert rss[CYCLES] - rss[1] < 25, rss
        print(f"\n{N_WORKERS} workers, {CYCLES} cycles: {res.wall:.1f} s, "
              f"server CPU {1000 * cpu / len(res.reports):.1f} ms/report, RSS MB {rss}")
    finally:
        srv.stop()
