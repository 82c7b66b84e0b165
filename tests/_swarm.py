"""Hundreds of concurrent plain-protocol workers in one asyncio loop (tests/load/).

Each simulated worker, pinned to one of the node URLs and to HTTP or WebSocket, loops like a
syft.js worker: authenticate -> long-polled cycle-request (``wait``) -> get-model -> report
a diff that depends on (worker, round) -> again, until the node rejects it without a
timeout (the process is finished). Everything it did is recorded so a test can check that
every report was counted exactly once in the checkpoint of its cycle.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np
from websockets.asyncio.client import connect

from gridfl import state


@dataclass
class Report:
    worker: int
    server: int
    transport: str
    model_sha: str  # sha256 of the checkpoint the worker downloaded (= its cycle's)
    diff: list
    accepted_at: float


@dataclass
class SwarmResult:
    reports: list[Report] = field(default_factory=list)
    rejections: int = 0
    calls: dict[str, list[float]] = field(default_factory=dict)  # kind -> latencies (s)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0


def diff_for(worker: int, rnd: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(worker * 1000 + rnd)
    return [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


async def run_swarm(
    urls: list[str],
    n: int,
    name: str,
    version: str,
    shapes,
    *,
    ws_every: int = 3,
    wait: float = 30.0,
    deadline: float = 120.0,
    hop: bool = False,
) -> SwarmResult:
    """Run ``n`` workers spread round-robin over ``urls`` (every ``ws_every``-th over
    WebSocket) until the process finishes or ``deadline`` seconds pass. With ``hop``, an
    HTTP worker downloads from the next server and reports to the one after (no sticky
    sessions: all state is in the shared database)."""
    res = SwarmResult()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None,
                          keepalive_expiry=5)
    clients = [httpx.AsyncClient(base_url=u, timeout=wait + 60, limits=limits) for u in urls]

    def timed(kind: str, t0: float) -> None:
        res.calls.setdefault(kind, []).append(time.perf_counter() - t0)

    async def worker(i: int) -> None:
        s = i % len(urls)
        http = clients[s]
        use_ws = ws_every > 0 and i % ws_every == ws_every - 1
        ws = None
        if use_ws:
            ws_url = urls[s].replace("http://", "ws://") + "/"
            ws = await connect(ws_url, max_size=None, open_timeout=60)

        async def call(kind: str, data: dict) -> tuple[int, dict]:
            t0 = time.perf_counter()
            if ws is None:
                c = clients[(s + 2) % len(urls)] if hop and kind.endswith("report") else http
                r = await c.post("/" + kind, json=data)
                out = r.status_code, r.json()
            else:
                rid = uuid.uuid4().hex
                await ws.send(json.dumps({"type": kind, "request_id": rid, "data": data}))
                reply = json.loads(await ws.recv())
                assert reply.get("request_id") == rid, reply
                body = reply["data"]
                out = body.get("status_code", 400) if "error" in body else 200, body
            timed(kind.rsplit("/", 1)[1], t0)
            return out

        rnd = 0
        try:
            while True:
                st, auth = await call("model-centric/authenticate",
                                      {"model_name": name, "model_version": version})
                assert st == 200, auth
                wid = auth["worker_id"]
                st, cyc = await call("model-centric/cycle-request", {
                    "worker_id": wid, "model": name, "version": version, "wait": wait})
                assert st == 200, cyc
                if cyc["status"] == "rejected":
                    res.rejections += 1
                    if cyc.get("timeout") is None:
                        return  # finished
                    continue
                accepted_at = time.time()
                t0 = time.perf_counter()
                dl = clients[(s + 1) % len(urls)] if hop else http
                r = await dl.get("/model-centric/get-model", params={
                    "worker_id": wid, "request_key": cyc["request_key"],
                    "model_id": cyc["model_id"]})
                timed("get-model", t0)
                assert r.status_code == 200, r.text
                diff = diff_for(i, rnd, shapes)
                st, rep = await call("model-centric/report", {
                    "worker_id": wid, "request_key": cyc["request_key"],
                    "diff": base64.b64encode(state.dumps(diff)).decode()})
                assert st == 200, rep
                res.reports.append(Report(i, s, "ws" if ws else "http",
                                          hashlib.sha256(r.content).hexdigest(), diff,
                                          accepted_at))
                rnd += 1
        except Exception as e:  # noqa: BLE001 - recorded; the test asserts there are none
            res.errors.append(f"worker {i}: {type(e).__name__}: {e}")
        finally:
            if ws is not None:
                await ws.close()

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(n))), deadline)
    finally:
        res.wall = time.perf_counter() - t0
        for c in clients:
            await c.aclose()
    return res


def check_counted_once(res: SwarmResult, checkpoints: list[bytes], base_tol=(1e-5, 1e-6)):
    """For every cycle c: checkpoint c+1 == checkpoint c - mean of exactly the diffs
    reported by the workers that trained checkpoint c. Returns reports per cycle."""
    sha = {hashlib.sha256(b).hexdigest(): k for k, b in enumerate(checkpoints)}
    per_cycle: dict[int, list[Report]] = {}
    for r in res.reports:
        assert r.model_sha in sha, "a worker trained a model that is no checkpoint"
        per_cycle.setdefault(sha[r.model_sha], []).append(r)
    for k in range(len(checkpoints) - 1):
        cur, new = state.loads(checkpoints[k]), state.loads(checkpoints[k + 1])
        diffs = [r.diff for r in per_cycle.get(k, [])]
        assert diffs, f"no report for cycle {k + 1}"
        for j, p in enumerate(cur):
            mean = np.mean(np.stack([d[j].astype(np.float64) for d in diffs]), axis=0)
            np.testing.assert_allclose(new[j], p - mean, rtol=base_tol[0], atol=base_tol[1])
    return per_cycle
