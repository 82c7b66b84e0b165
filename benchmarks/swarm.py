"""A swarm of light simulated workers against a live node: thousands of them in a few
asyncio processes, speaking the real protocol (the worker SDK's messages in
``gridfl._messages``) over WebSocket and HTTP.

Each simulated worker arrives at a time drawn from an arrival pattern (``uniform`` over
the window, a ``burst`` in its first second, or ``diurnal``: a day squeezed into the
window, with its peak in the middle), then behaves like a device:

* ``connections`` scenario: one WebSocket kept open (``gridfl.binary.2``), authenticate,
  then cycle-requests held by the node (``wait``); accepted, it downloads the model over
  the socket and reports a binary frame; then it asks again, until the process finishes.
  The tool measures the node's memory per open connection, its CPU while every worker is
  connected and idle, and the time from a cycle opening to each held worker's acceptance.
* ``pace`` scenario: devices that connect only to check in (syft.js without ``wait``):
  authenticate and cycle-request over a fresh socket (or HTTP), and come back after the
  ``timeout`` the node gives; accepted, they report once and leave. Run with and without
  ``pace_steering`` side by side: the node's peak CPU and open connections, and how fast
  the rounds complete.

    nice -n 10 python -m benchmarks.swarm connections --workers 10000 --procs 4
    nice -n 10 python -m benchmarks.swarm pace --workers 10000 --per-cycle 500

``--url`` drives a node already running (no node figures then); by default the tool
starts one ``gridfl serve`` on SQLite in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gridfl import _messages as m

ADMIN = "swarm-admin-token"
#: the tiny model every simulated worker trains (the node only folds its diffs)
TINY_SHAPES = [(4, 3), (3,)]
PATTERNS = ("uniform", "burst", "diurnal")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (a socket is a file);
    returns the new soft limit. Children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def arrival_times(pattern: str, n: int, window: float, seed: int = 0) -> list[float]:
    """``n`` arrival offsets in seconds, sorted, within ``window`` (a burst: its first
    second). ``diurnal`` draws from the density ``1 - cos(2 pi t / window)`` (quiet at the
    ends, peak in the middle) by inverting its distribution numerically.

    >>> arrival_times("burst", 3, 60.0, seed=1)[-1] <= 1.0
    True
    >>> ts = arrival_times("diurnal", 10000, 100.0)
    >>> sum(25 <= t < 75 for t in ts) / len(ts) > 0.8  # 0.818 in theory
    True
    """
    if pattern not in PATTERNS:
        raise ValueError(f"arrival pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
    if n < 0 or window <= 0:
        raise ValueError("n must be >= 0 and window > 0")
    rng = random.Random(seed)
    if pattern == "burst":
        return sorted(rng.random() * min(1.0, window) for _ in range(n))
    if pattern == "uniform":
        return sorted(rng.random() * window for _ in range(n))
    grid = np.linspace(0.0, 1.0, 4097)
    cdf = grid - np.sin(2 * np.pi * grid) / (2 * np.pi)  # integral of 1 - cos, normalised
    u = np.array(sorted(rng.random() for _ in range(n)))
    return [float(t) for t in np.interp(u, cdf, grid) * window]


def tiny_diff(worker: int) -> list[np.ndarray]:
    """Worker ``worker``'s diff: its index spread over the tiny model (a test can average
    these independently)."""
    return [np.full(s, 0.001 * (worker % 97), np.float32) for s in TINY_SHAPES]


def host_payload(name: str, server_config: dict[str, Any]) -> dict[str, Any]:
    """A process with the tiny model and a loadable training plan."""
    from benchmarks.bench_server import b64, plan_bytes
    from gridfl import state

    model = [np.zeros(s, np.float32) for s in TINY_SHAPES]
    return {
        "client_config": {"name": name, "version": "1", "lr": 0.05, "batch_size": 10},
        "server_config": server_config,
        "model": b64(state.dumps(model)),
        "plans": {"training_plan": b64(plan_bytes(TINY_SHAPES))},
    }


@dataclass
class Tally:
    """What one swarm process saw: per-call counts and errors, acceptance times."""

    #: (the worker's acceptance count so far, time.time()) of each acceptance: in the
    #: ``connections`` scenario every worker joins every cycle, so that count is the cycle's
    accepted_at: list[tuple[int, float]] = field(default_factory=list)
    reports: int = 0
    late: int = 0  # accepted, but its cycle closed before the report (LATE)
    check_ins: int = 0
    rejections: int = 0
    errors: list[str] = field(default_factory=list)
    connected: int = 0


class Refused(Exception):
    """The node refused a call with an HTTP status (a 409 for a report to a cycle that
    closed meanwhile, say)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


#: refusals a device meets when its cycle closed (completed or expired) before it reported:
#: the late report is dropped, as a real device's would be
LATE = (401, 409)


class _Socket:
    """One worker's WebSocket: JSON requests, replies matched by ``request_id``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def call(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        rid = secrets.token_hex(8)
        await self.conn.send(json.dumps({"type": kind, "data": data, "request_id": rid}))
        return self._data(await self.conn.recv(), rid)

    async def report(self, req: m.ReportRequest) -> dict[str, Any]:
        rid = secrets.token_hex(8)
        await self.conn.send(m.encode_binary_report(req.to_json(raw_diff=True), rid))
        return self._data(await self.conn.recv(), rid)

    async def download(self, kind: str, data: dict[str, Any]) -> bytes:
        rid = secrets.token_hex(8)
        await self.conn.send(json.dumps({"type": kind, "data": data, "request_id": rid}))
        reply = await self.conn.recv()
        if isinstance(reply, str):  # an error comes as JSON
            self._data(reply, rid)
            raise RuntimeError(f"{kind}: a text reply to a download: {reply[:200]}")
        head, payload = m.split_binary_frame(reply)
        if json.loads(head).get("request_id") != rid:
            raise RuntimeError(f"{kind}: the reply is for another request")
        return payload

    @staticmethod
    def _data(raw: Any, rid: str) -> dict[str, Any]:
        frame = json.loads(raw)
        if frame.get("request_id") != rid:
            raise RuntimeError(f"a reply for another request: {str(raw)[:200]}")
        data = frame.get("data") or {}
        if "error" in data and data.get("status") != "rejected":
            raise Refused(data.get("status_code", 400), f"{frame.get('type')}: {data['error']}")
        return data


async def _connect(ws_url: str) -> _Socket:
    from websockets.asyncio.client import connect

    conn = await connect(ws_url, subprotocols=[m.BINARY_SUBPROTOCOL],  # type: ignore[list-item]
                         max_size=None, open_timeout=120, ping_interval=None,
                         compression=None)
    return _Socket(conn)


async def _train_and_report(sock: _Socket, wid: str, acc: m.CycleAccepted, i: int) -> None:
    from gridfl import state

    await sock.download(m.GET_MODEL, m.AssetRequest(wid, acc.request_key, acc.model_id)
                        .to_json("model_id"))
    rep = m.ReportRequest(wid, acc.request_key, state.dumps(tiny_diff(i)), num_samples=10)
    m.parse_report_response(await sock.report(rep))


async def _connected_worker(i: int, url: str, name: str, start: float, at: float,
                            go: asyncio.Event, tally: Tally,
                            wait: float) -> None:
    """The ``connections`` scenario's worker (see the module's docstring)."""
    await asyncio.sleep(max(0.0, start + at - time.time()))
    sock = None
    try:
        sock = await _connect(url.replace("http", "ws", 1) + "/")
        auth = m.parse_authenticate_response(await sock.call(
            m.AUTHENTICATE, m.AuthenticateRequest(name, "1").to_json()))
        tally.connected += 1
        await go.wait()
        joined = 0
        while True:
            tally.check_ins += 1
            reply = m.parse_cycle_response(await sock.call(
                m.CYCLE_REQUEST, m.CycleRequest(auth.worker_id, name, "1", wait=wait).to_json()))
            if isinstance(reply, m.CycleRejected):
                tally.rejections += 1
                if reply.timeout is None:
                    return  # the process is finished
                continue
            tally.accepted_at.append((joined, time.time()))
            joined += 1
            await _train_and_report(sock, auth.worker_id, reply, i)
            tally.reports += 1
    except Exception as e:  # noqa: BLE001 - counted; the run reports every error
        tally.errors.append(f"worker {i}: {type(e).__name__}: {e}")
    finally:
        if sock is not None:
            await sock.conn.close()


async def _check_in_device(i: int, url: str, name: str, start: float, at: float,
                           tally: Tally, http_every: int, stop: asyncio.Event) -> None:
    """The ``pace`` scenario's device: it connects only to check in, and comes back after
    the ``timeout`` the node gives; it trains once."""
    import httpx

    if await _stopped(stop, start + at - time.time()):
        return
    use_http = http_every > 0 and i % http_every == 0
    try:
        while True:
            tally.check_ins += 1
            if use_http:
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    r = await client.post("/" + m.AUTHENTICATE,
                                          json=m.AuthenticateRequest(name, "1").to_json())
                    wid = m.parse_authenticate_response(r.json()).worker_id
                    r = await client.post("/" + m.CYCLE_REQUEST,
                                          json=m.CycleRequest(wid, name, "1").to_json())
                    reply = m.parse_cycle_response(r.json())
                    if isinstance(reply, m.CycleAccepted):
                        tally.accepted_at.append((0, time.time()))
                        r = await client.get("/" + m.GET_MODEL, params=m.AssetRequest(
                            wid, reply.request_key, reply.model_id).to_json("model_id"))
                        _check(r)
                        rep = m.ReportRequest(wid, reply.request_key, _state_bytes(i),
                                              num_samples=10)
                        r = await client.post("/" + m.REPORT, json=rep.to_json())
                        m.parse_report_response(_check(r).json())
            else:
                sock = await _connect(url.replace("http", "ws", 1) + "/")
                try:
                    wid = m.parse_authenticate_response(await sock.call(
                        m.AUTHENTICATE, m.AuthenticateRequest(name, "1").to_json())).worker_id
                    reply = m.parse_cycle_response(await sock.call(
                        m.CYCLE_REQUEST, m.CycleRequest(wid, name, "1").to_json()))
                    if isinstance(reply, m.CycleAccepted):
                        tally.accepted_at.append((0, time.time()))
                        await _train_and_report(sock, wid, reply, i)
                finally:
                    await sock.conn.close()
            if isinstance(reply, m.CycleAccepted):
                tally.reports += 1
                return
            tally.rejections += 1
            if reply.timeout is None or await _stopped(stop, reply.timeout):
                return
    except Refused as e:
        if e.status in LATE:
            tally.late += 1
        else:
            tally.errors.append(f"device {i}: {e}")
    except Exception as e:  # noqa: BLE001 - counted; the run reports every error
        tally.errors.append(f"device {i}: {type(e).__name__}: {e}")


def _check(r: Any) -> Any:
    """An HTTP reply, or :class:`Refused` with its status."""
    if r.status_code != 200:
        raise Refused(r.status_code, r.text[:300])
    return r


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds; True if the run was stopped meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, delay))
    return stop.is_set()


def _state_bytes(i: int) -> bytes:
    from gridfl import state

    return state.dumps(tiny_diff(i))


@dataclass
class Job:
    """One swarm process's share of the workers."""

    scenario: str
    url: str
    name: str
    indices: list[int]
    offsets: list[float]
    start: float
    wait: float = m.MAX_WAIT
    http_every: int = 0


def _run_job(job: Job, conn: Any) -> None:
    """A swarm process: run its workers; tell the controller when all are connected (the
    ``connections`` scenario), wait for its go, and send back its :class:`Tally`."""
    raise_fd_limit()
    tally = Tally()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if job.scenario == "pace":  # the controller says stop once the process finished
            stop = asyncio.Event()
            told = loop.run_in_executor(None, conn.recv)
            told.add_done_callback(lambda _: stop.set())
            await asyncio.gather(*(
                _check_in_device(i, job.url, job.name, job.start, at, tally, job.http_every,
                                 stop)
                for i, at in zip(job.indices, job.offsets, strict=True)))
            await told
            return
        go = asyncio.Event()
        tasks = [asyncio.create_task(_connected_worker(
            i, job.url, job.name, job.start, at, go, tally, job.wait))
            for i, at in zip(job.indices, job.offsets, strict=True)]
        while tally.connected + len(tally.errors) < len(tasks):
            await asyncio.sleep(0.1)
        conn.send(("connected", tally.connected, len(tally.errors)))
        await loop.run_in_executor(None, conn.recv)  # the go
        go.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    conn.send(("done", tally))


# --- the controller: node process, its figures, the swarm processes -----------------------


class NodeMeter:
    """CPU seconds, RSS and open sockets of the node's process (``/proc``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def mem_kb(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} for process {self.pid}")

    def sockets(self) -> int:
        n = 0
        for fd in os.scandir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                n += os.readlink(fd.path).startswith("socket:")
        return n


class LocalNode:
    """``gridfl serve`` on SQLite in a temporary folder, with the raised fd limit."""

    def __init__(self, port: int, env: dict[str, str] | None = None) -> None:
        raise_fd_limit()
        self.tmp = tempfile.TemporaryDirectory()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(self.tmp.name) / "serve.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gridfl", "serve", "--port", str(port), "--data-dir",
             self.tmp.name, "--admin-token", ADMIN, "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log_text()) from None
                time.sleep(0.1)
        self.meter = NodeMeter(self.proc.pid)

    def log_text(self) -> str:
        return (Path(self.tmp.name) / "serve.log").read_text()[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()
        self.tmp.cleanup()


def admin_client(url: str, token: str = ADMIN) -> Any:
    import httpx

    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})


def _spawn(jobs: list[Job]) -> list[tuple[Any, Any]]:
    ctx = mp.get_context("spawn")  # no copy of the controller's state or threads
    out = []
    for job in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_run_job, args=(job, child), daemon=True)
        proc.start()
        out.append((proc, parent))
    return out


def _split(scenario: str, url: str, name: str, n: int, procs: int, pattern: str,
           window: float, **kw: Any) -> list[Job]:
    offsets = arrival_times(pattern, n, window)
    order = list(range(n))
    random.Random(1).shuffle(order)  # arrivals spread over the processes
    start = time.time() + 3.0  # the processes start meanwhile
    return [Job(scenario, url, name, [order[k] for k in range(p, n, procs)],
                [offsets[k] for k in range(p, n, procs)], start, **kw) for p in range(procs)]


def pct(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``xs``; nan for none."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class ConnectionsResult:
    workers: int
    errors: list[str]
    reports: int
    kb_per_connection: float
    idle_cpu_s: float  # node CPU over ``idle_s`` seconds with every worker connected
    idle_s: float
    admit_ms: list[float]  # per held worker: its cycle's opening to its acceptance
    cycles: list[dict[str, Any]]
    peak_rss_mb: float


def run_connections(url: str, meter: NodeMeter | None, n: int, *, procs: int = 4,
                    pattern: str = "burst", window: float = 10.0, cycles: int = 2,
                    idle_s: float = 5.0, name: str = "swarm",
                    token: str = ADMIN) -> ConnectionsResult:
    """``n`` workers on open WebSockets complete ``cycles`` cycles of ``n`` each; every
    cycle after the first opens in front of ``n - 1`` held requests."""
    admin = admin_client(url, token)
    sc = {"max_workers": n, "max_diffs": n, "min_diffs": n, "num_cycles": cycles,
          "cycle_length": 3600}
    r = admin.post("/gridfl/v1/processes", json=host_payload(name, sc))
    if r.status_code != 201:
        raise RuntimeError(f"hosting failed: {r.status_code} {r.text}")
    rss0 = meter.mem_kb() if meter else 0
    running = _spawn(_split("connections", url, name, n, procs, pattern, window))
    connected = errors = 0
    for _, pipe in running:
        _, c, e = pipe.recv()
        connected, errors = connected + c, errors + e
    kb = (meter.mem_kb() - rss0) / max(1, connected) if meter else float("nan")
    cpu0 = meter.cpu() if meter else 0.0
    time.sleep(idle_s)
    idle_cpu = meter.cpu() - cpu0 if meter else float("nan")
    for _, pipe in running:
        pipe.send("go")
    tallies = [pipe.recv()[1] for _, pipe in running]
    for proc, _ in running:
        proc.join(timeout=60)
    st = admin.get(f"/gridfl/v1/processes/{name}/1").json()
    opened = [c["start"] for c in st["cycles"]]
    admit = []
    for t in tallies:
        for k, at in t.accepted_at:
            if 0 < k < len(opened):  # the first cycle opened before anyone asked
                admit.append(1000 * (at - opened[k]))
    return ConnectionsResult(
        workers=n, errors=[e for t in tallies for e in t.errors],
        reports=sum(t.reports for t in tallies), kb_per_connection=kb,
        idle_cpu_s=idle_cpu, idle_s=idle_s, admit_ms=admit, cycles=st["cycles"],
        peak_rss_mb=meter.mem_kb("VmHWM") / 1024 if meter else float("nan"))


@dataclass
class PaceResult:
    pace: bool
    errors: list[str]
    reports: int
    late: int
    check_ins: int
    peak_cpu: float  # the highest node CPU share over a 1 s window (1.0 = one core)
    peak_sockets: int
    completed_at: list[float]  # seconds from the first arrival to each cycle's close
    wall: float


def run_pace(url: str, meter: NodeMeter, n: int, *, pace: bool, per_cycle: int,
             cycles: int, procs: int = 4, pattern: str = "burst", window: float = 1.0,
             cycle_length: float = 20.0, window_s: float = 10.0, http_every: int = 0,
             limit: float = 600.0,
             name: str = "pace", token: str = ADMIN) -> PaceResult:
    """``n`` check-in devices against a process of ``cycles`` cycles of ``per_cycle``."""
    admin = admin_client(url, token)
    name = f"{name}{'on' if pace else 'off'}"
    sc = {"max_workers": per_cycle, "max_diffs": per_cycle, "min_diffs": per_cycle,
          "num_cycles": cycles, "cycle_length": cycle_length,
          "pace_steering": {"window": window_s} if pace else None}
    r = admin.post("/gridfl/v1/processes", json=host_payload(name, sc))
    if r.status_code != 201:
        raise RuntimeError(f"hosting failed: {r.status_code} {r.text}")
    jobs = _split("pace", url, name, n, procs, pattern, window, http_every=http_every)
    running = _spawn(jobs)
    peak_cpu, peak_sockets = 0.0, 0
    last_t, last_cpu = time.time(), meter.cpu()
    status, checked = "running", 0.0
    while status == "running" and time.time() < jobs[0].start + limit:
        time.sleep(0.2)
        if time.time() - checked > 2:  # one cycle's row: the poll costs the node little
            checked = time.time()
            status = admin.get(f"/gridfl/v1/processes/{name}/1?cycles=1").json()["status"]
        peak_sockets = max(peak_sockets, meter.sockets())
        now = time.time()
        if now - last_t >= 1.0:
            cpu = meter.cpu()
            peak_cpu = max(peak_cpu, (cpu - last_cpu) / (now - last_t))
            last_t, last_cpu = now, cpu
    for _, pipe in running:
        pipe.send("stop")
    tallies = [pipe.recv()[1] for _, pipe in running]
    for proc, _ in running:
        proc.join(timeout=60)
    start = jobs[0].start
    st = admin.get(f"/gridfl/v1/processes/{name}/1").json()
    done = [c["closed_at"] - start for c in st["cycles"] if c["status"] == "completed"]
    return PaceResult(pace, [e for t in tallies for e in t.errors],
                      sum(t.reports for t in tallies), sum(t.late for t in tallies),
                      sum(t.check_ins for t in tallies),
                      peak_cpu, peak_sockets, sorted(done), time.time() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.swarm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=("connections", "pace"))
    ap.add_argument("--workers", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4, help="swarm processes")
    ap.add_argument("--arrival", choices=PATTERNS, default="burst")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds over which workers arrive (default: 10, a burst 1)")
    ap.add_argument("--cycles", type=int, default=None)
    ap.add_argument("--per-cycle", type=int, default=500, help="pace: reports per cycle")
    ap.add_argument("--cycle-length", type=float, default=20.0, help="pace: seconds")
    ap.add_argument("--pace-window", type=float, default=10.0,
                    help="pace: pace_steering's window, seconds")
    ap.add_argument("--http-every", type=int, default=0,
                    help="pace: every k-th device checks in over HTTP (0: none)")
    ap.add_argument("--url", help="a running node (default: start one)")
    ap.add_argument("--port", type=int, default=5397)
    args = ap.parse_args(argv)
    if args.workers < 1 or args.procs < 1:
        ap.error("--workers and --procs must be at least 1")
    window = args.window or (1.0 if args.arrival == "burst" else 10.0)
    print(f"open-file limit {raise_fd_limit()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    node = None if args.url else LocalNode(args.port)
    url = args.url or node.url  # type: ignore[union-attr]
    meter = node.meter if node else None
    try:
        if args.scenario == "connections":
            res = run_connections(url, meter, args.workers, procs=args.procs,
                                  pattern=args.arrival, window=window,
                                  cycles=args.cycles or 2)
            print(f"{res.workers} workers, {res.reports} reports, {len(res.errors)} errors; "
                  f"cycles: {[(c['sequence'], c['status'], c['reported']) for c in res.cycles]}")
            print(f"node memory per connection {res.kb_per_connection:.1f} KB, "
                  f"peak RSS {res.peak_rss_mb:.0f} MB; node CPU while all were connected "
                  f"and idle: {res.idle_cpu_s:.2f} s in {res.idle_s:.0f} s")
            print(f"cycle opening -> held worker accepted ({len(res.admit_ms)}): "
                  f"p50 {pct(res.admit_ms, 50):.0f} ms, p99 {pct(res.admit_ms, 99):.0f} ms, "
                  f"max {pct(res.admit_ms, 100):.0f} ms")
        else:
            if meter is None:
                ap.error("the pace scenario measures the node: leave out --url")
            print(f"{'pace':>5} {'errors':>6} {'reports':>7} {'late':>5} {'check-ins':>9} "
                  f"{'peak cpu':>8} {'peak sockets':>12}  cycles closed at (s)")
            for pace in (False, True):
                pr = run_pace(url, meter, args.workers, pace=pace, per_cycle=args.per_cycle,
                              cycles=args.cycles or 4, procs=args.procs,
                              pattern=args.arrival, window=window,
                              cycle_length=args.cycle_length, window_s=args.pace_window,
                              http_every=args.http_every)
                print(f"{'on' if pace else 'off':>5} {len(pr.errors):>6} {pr.reports:>7} "
                      f"{pr.late:>5} "
                      f"{pr.check_ins:>9} {pr.peak_cpu:>8.2f} {pr.peak_sockets:>12}  "
                      f"{' '.join(f'{t:.0f}' for t in pr.completed_at)}", flush=True)
                for e in pr.errors[:5]:
                    print("  ", e)
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        if node is not None:
            node.stop()


if __name__ == "__main__":
    main()
