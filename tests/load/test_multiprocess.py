"""Several server processes on one PostgreSQL database (docs/deployment.md): three
``gridfl serve`` processes on separate ports, 240 concurrent workers (HTTP and WebSocket)
spread over them, three cycles. Every report is counted once, each cycle is aggregated
exactly once, checkpoints are consecutive, the counts add up, and a cycle opened by one
process is shared with workers long-polling on the others (PostgreSQL NOTIFY).
HTTP workers download from and report to other processes than the one that accepted them
(no sticky sessions needed)."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests._swarm import check_counted_once, run_swarm
from tests.builders import ADMIN, host_payload
from tests.harness import Serve

pytestmark = pytest.mark.postgres

SHAPES = [(4, 3), (3,)]
N_WORKERS, PER_CYCLE, CYCLES, SERVERS = 240, 80, 3, 3


def test_three_processes_one_postgres_240_workers(pg_fresh_db, tmp_path):
    servers = [Serve(pg_fresh_db, tmp_path, wait=False) for _ in range(SERVERS)]
    try:
        for s in servers:
            s.ready()
        admin = httpx.Client(base_url=servers[0].url, timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        sc = {"max_workers": PER_CYCLE, "max_diffs": PER_CYCLE, "num_cycles": CYCLES,
              "cycle_length": 300}
        r = admin.post("/gridfl/v1/processes", json=host_payload(server_config=sc))
        assert r.status_code == 201, r.text

        res = asyncio.run(run_swarm([s.url for s in servers], N_WORKERS, "mnist", "1.0",
                                    SHAPES, wait=30, deadline=120, hop=True))
        assert res.errors == []

        # every server process saw the same state; read it through another one
        st = httpx.get(f"{servers[2].url}/gridfl/v1/processes/mnist/1.0",
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60).json()
        assert st["status"] == "finished"
        cycles = st["cycles"]
        assert [(c["sequence"], c["status"]) for c in cycles] == [
            (k + 1, "completed") for k in range(CYCLES)
        ]
        # each cycle aggregated exactly once: one result checkpoint each, consecutive
        assert [c["checkpoint"] for c in cycles] == list(range(1, CYCLES + 1))
        assert [c["result_checkpoint"] for c in cycles] == list(range(2, CYCLES + 2))
        assert [c["number"] for c in st["checkpoints"]] == list(range(1, CYCLES + 2))
        # counts add up: accepted == reported == per-cycle cap; sum == reports the workers made
        assert [(c["accepted"], c["reported"]) for c in cycles] == [(PER_CYCLE, PER_CYCLE)] * 3
        assert len(res.reports) == sum(c["reported"] for c in cycles) == PER_CYCLE * CYCLES
        assert len({(r.worker, r.model_sha) for r in res.reports}) == len(res.reports)

        # every report counted exactly once, in the checkpoint of the cycle it trained
        ckpts = [
            admin.get(f"/gridfl/v1/processes/mnist/1.0/checkpoints/{k}").content
            for k in range(1, CYCLES + 2)
        ]
        per_cycle = check_counted_once(res, ckpts)
        assert [len(per_cycle[k]) for k in range(CYCLES)] == [PER_CYCLE] * CYCLES

        # spread: every process served the workers that reported: it seated them (their
        # own process), sent them the model (the next one) or took their report (the one
        # after next over HTTP, their own over WebSocket), and both transports took part.
        # Which processes seat workers is a race that WebSocket workers (all on process 2
        # here) mostly win in the first cycle, and an opener admits its own waiters first:
        # that at least two processes share each later cycle is asserted below.
        served = set()
        for r in res.reports:
            report_to = (r.server + 2) % SERVERS if r.transport == "http" else r.server
            served |= {r.server, (r.server + 1) % SERVERS, report_to}
        assert served == set(range(SERVERS)), Counter((r.server, r.transport)
                                                      for r in res.reports)
        assert set(Counter(r.transport for r in res.reports)) == {"http", "ws"}
        # every cycle after the first filled from long-polled requests within seconds of
        # opening, on whichever processes took part: nobody waited out the 30 s long-poll.
        # The opening process wakes its own waiters at once and, through PostgreSQL
        # NOTIFY, the others within milliseconds, so they share each cycle (without the
        # NOTIFY the opener's own waiters took all 80 seats before the others' 1 s watcher
        # looked).
        for k in range(1, CYCLES):
            assert len({r.server for r in per_cycle[k]}) >= 2, (k + 1, Counter(
                r.server for r in per_cycle[k]))
            start = cycles[k]["start"]
            firsts = {}
            for r in per_cycle[k]:
                firsts[r.server] = min(firsts.get(r.server, r.accepted_at), r.accepted_at)
            assert firsts, (k + 1, firsts)
            for s, first in firsts.items():
                assert first - start < 5.0, (k + 1, s, first - start)
            assert max(r.accepted_at for r in per_cycle[k]) - start < 5.0, k + 1
    finally:
        for s in servers:
            s.stop()
