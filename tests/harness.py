"""The one test harness of a grid node: the node's app in process with no socket
(:class:`InProcessNode`, for tests that need none), a real node on a loopback port, either
in a thread (:class:`LiveNode`, the node's own ``make_server`` and ``uvicorn_options``) or
as a ``gridfl serve`` subprocess (:class:`Serve`, for tests that kill or restart it), and
the plain protocol clients that talk to either by hand. Fixtures wrapping these are in
tests/conftest.py; shared payloads and plans in tests/builders.py."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from gridfl import state
from gridfl.host import HostClient
from tests.builders import ADMIN, b64, linear_params, linear_sgd_plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_threads(fn, calls, timeout: float = 120) -> list:
    """``fn(*args)`` for every ``args`` in ``calls``, each in its own thread, all at once;
    their results in order. Fails if any thread raised (with every error) or is still
    running after ``timeout`` seconds (the node under test hung)."""
    calls = list(calls)
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def one(i: int, args) -> None:
        try:
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, a), daemon=True)
               for i, a in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} of {len(threads)} threads still running after {timeout} s"
    if errors:
        raise AssertionError(f"{len(errors)} of {len(threads)} threads failed: {errors}") \
            from errors[0]
    return results


# --------------------------------------------------------------------------- in-thread node
def make_settings(db_url: str | None, data_dir, **overrides):
    """Settings of a test node: the test admin token, a 1 MiB speed test (PyGrid's 64 MiB
    only costs time), and ``db_url`` or else an SQLite file ``grid.db`` in ``data_dir``."""
    from gridfl.server import Settings

    overrides.setdefault("admin_token", ADMIN)
    overrides.setdefault("speed_test_bytes", 1 << 20)
    db_url = db_url or f"sqlite:///{Path(data_dir) / 'grid.db'}"
    return Settings(data_dir=data_dir, database_url=db_url, **overrides)


class LiveNode:
    """``gridfl.server`` served by uvicorn on 127.0.0.1, in a thread, until :meth:`stop`:
    ``gridfl serve``'s server (``make_server``, so its ``uvicorn_options``), minus a process.
    ``host_client`` is the shipped :class:`gridfl.host.HostClient` (None without a token)."""

    def __init__(self, settings) -> None:
        from gridfl.server import make_server

        self.settings = settings
        self.db_url = settings.resolved_database_url()
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.server = make_server(
            settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the grid node did not start")
            time.sleep(0.01)
        self.host_client = (
            HostClient(self.http_url, admin_token=settings.admin_token, timeout=60)
            if settings.admin_token
            else None
        )

    @property
    def url(self) -> str:
        """The node's HTTP base URL."""
        return self.http_url

    def url_for(self, transport: str) -> str:
        """The URL a worker SDK connects to over ``transport`` ("ws" or "http")."""
        return self.ws_url if transport == "ws" else self.http_url

    @property
    def node(self):
        """The running ``GridNode`` (for tests that look inside)."""
        app = self.server.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        return app.state.node

    # ------------------------------------------------------------------ admin API (HostClient)
    def host(self, name: str | None = None, *, server_config=None, client_config=None,
             params=None, plan: bytes | None = None, plans=None, protocols=None) -> str:
        """Host an FL process (version "1.0"), by default the tiny linear-regression plan
        of tests/builders.py; return its name."""
        name = name or f"m{uuid.uuid4().hex[:10]}"
        sc = {"cycle_length": 60, "num_cycles": 0, "max_diffs": 100}
        sc.update(server_config or {})
        cc = {"name": name, "version": "1.0", "batch_size": 8, "lr": 0.05, "max_updates": 4}
        cc.update(client_config or {})
        self.host_client.host(
            model=params if params is not None else linear_params(),
            plans=plans if plans is not None else {"training_plan": plan or linear_sgd_plan()},
            client_config=cc,
            server_config=sc,
            protocols=protocols,
        )
        return name

    def status(self, name: str, version: str = "1.0") -> dict:
        return self.host_client.status(name, version)

    def checkpoint(self, name: str, ref="latest", version: str = "1.0") -> list[np.ndarray]:
        return self.host_client.retrieve(name, version, ref)

    # ------------------------------------------------------------------ the node's database
    def corrupt(self, name: str, *, plan: bytes | None = None, model: bytes | None = None):
        """Overwrite a hosted plan's ONNX bytes or the model checkpoint in the node's DB."""
        import sqlalchemy as sa

        from gridfl.server.tables import checkpoints, plans, processes

        eng = sa.create_engine(self.db_url)
        with eng.begin() as conn:
            pid = conn.execute(
                sa.select(processes.c.id).where(processes.c.name == name)
            ).scalar_one()
            if plan is not None:
                conn.execute(plans.update().where(plans.c.process_id == pid).values(onnx=plan))
            if model is not None:
                conn.execute(
                    checkpoints.update().where(checkpoints.c.process_id == pid).values(data=model)
                )
        eng.dispose()

    def worker_row(self, worker_id: str):
        """The node's stored row of a worker (ping / download / upload of its speed test)."""
        import sqlalchemy as sa

        from gridfl.server.tables import workers

        eng = sa.create_engine(self.db_url)
        try:
            with eng.connect() as conn:
                return conn.execute(sa.select(workers).where(workers.c.id == worker_id)).one()
        finally:
            eng.dispose()

    def stop(self) -> None:
        if self.host_client is not None:
            self.host_client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)


# --------------------------------------------------------------------------- node process
class Serve:
    """``python -m gridfl serve`` as a subprocess (a real process we can ``kill -9``)."""

    def __init__(self, database_url: str, tmp: Path, *, port: int | None = None,
                 env: dict | None = None, log: Path | None = None, wait: bool = True) -> None:
        self.database_url = database_url
        self.tmp = Path(tmp)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/"
        self.extra_env = dict(env or {})
        self.log = log or self.tmp / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start(wait=wait)

    def start(self, env: dict | None = None, *, wait: bool = True) -> Serve:
        full = {k: v for k, v in os.environ.items()
                if k not in ("GRIDFL_DATABASE_URL", "GRIDFL_TEST_CRASH_AT")}
        full.update(self.extra_env if env is None else env)
        cmd = [sys.executable, "-m", "gridfl", "serve", "--port", str(self.port),
               "--data-dir", str(self.tmp / "data"), "--database-url", self.database_url,
               "--admin-token", ADMIN, "--log-level", "warning"]
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, env=full, stdout=self._logf, stderr=subprocess.STDOUT)
        return self.ready() if wait else self

    def ready(self) -> Serve:
        """Wait until ``/health`` answers."""
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gridfl serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self) -> None:
        """SIGKILL, as ``kill -9``: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._logf.close()
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._logf.closed:
            self._logf.close()


# --------------------------------------------------------------------------- demo process
# Starts ``gridfl demo`` with SIGINT at its default action. A process started from a
# shell's background job inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt: Ctrl-C would be tested only where the suite ran in a foreground.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Demo:
    """``gridfl demo ARGS`` in a process of its own, its stderr read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SIGINT_DEFAULT, "-m", "gridfl", "demo", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "COLUMNS": "500", "TERM": "dumb"},  # rich folds nothing
        )
        self._lines: queue.Queue = queue.Queue()
        self._seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._seen.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def output(self) -> str:
        """Everything the demo printed so far."""
        return "".join(self._seen)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first line from now on that matches ``pattern``; fails if the demo ends or
        ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s:\n"
                                     + self.output) from None
            if line is None:
                raise AssertionError(f"gridfl demo ended (code {self.proc.wait()}) before a "
                                     f"line matching {pattern!r}:\n{self.output}")
            if m := re.search(pattern, line):
                return m

    def descendants(self) -> set[int]:
        """The pids of every process the demo started, and theirs (Linux)."""
        found: set[int] = set()
        parents = [self.proc.pid]
        while parents:
            pid = parents.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(FileNotFoundError):
                    children = {int(c) for c in (task / "children").read_text().split()}
                    parents.extend(children - found)
                    found |= children
        return found

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``signum``; its exit code. Fails, with what it printed, if it does not end
        within ``timeout`` seconds (then it is killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"gridfl demo did not end within {timeout:.0f} s of signal "
                                 f"{signal.Signals(signum).name}:\n{self.output}") from None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- in-process node
class _PortalTransport(httpx.BaseTransport):
    """A blocking httpx transport into an ASGI app running on a portal's event loop."""

    def __init__(self, app, portal) -> None:
        self._asgi = httpx.ASGITransport(app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def send() -> httpx.Response:
            inner = httpx.Request(request.method, request.url, headers=request.headers,
                                  content=body)
            response = await self._asgi.handle_async_request(inner)
            content = b"".join([chunk async for chunk in response.stream])
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=content)

        return self._portal.call(send)


#: base URL -> transport of every running InProcessNode; the plain clients below use it
_IN_PROCESS: dict[str, httpx.BaseTransport] = {}


class InProcessNode:
    """The node's ASGI app (startup and background tasks included) on an event loop in a
    thread, reached through httpx with no socket: ``url`` works with :class:`Admin` and
    :class:`HttpWorker` as a live node's does. For tests that need no real connection
    (no WebSocket, no raw socket, no process)."""

    def __init__(self, settings) -> None:
        from anyio.from_thread import start_blocking_portal

        from gridfl.server import create_app

        self.settings = settings
        self.app = create_app(settings)
        self._portal_cm = start_blocking_portal()
        portal = self._portal_cm.__enter__()
        self._lifespan = portal.wrap_async_context_manager(
            self.app.router.lifespan_context(self.app)
        )
        self._lifespan.__enter__()
        self.url = f"http://in-process-{uuid.uuid4().hex[:8]}.test"
        _IN_PROCESS[self.url] = _PortalTransport(self.app, portal)

    @property
    def node(self):
        """The running ``GridNode``."""
        return self.app.state.node

    def stop(self) -> None:
        _IN_PROCESS.pop(self.url, None)
        self._lifespan.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)


def _client(url: str, **kw) -> httpx.Client:
    """An httpx client of the node at ``url``: in process if it is an InProcessNode's."""
    return httpx.Client(base_url=url, timeout=60, transport=_IN_PROCESS.get(url), **kw)


# --------------------------------------------------------------------------- plain protocol clients
class Admin:
    def __init__(self, url: str, token: str = ADMIN):
        self.http = _client(url, headers={"Authorization": f"Bearer {token}"})

    def host(self, payload: dict):
        return self.http.post("/gridfl/v1/processes", json=payload)

    def status(self, name="mnist", version="1.0") -> dict:
        r = self.http.get(f"/gridfl/v1/processes/{name}/{version}")
        assert r.status_code == 200, r.text
        return r.json()

    def checkpoint(self, ref="latest", name="mnist", version="1.0") -> list[np.ndarray]:
        r = self.http.get(f"/gridfl/v1/processes/{name}/{version}/checkpoints/{ref}")
        assert r.status_code == 200, r.text
        return state.loads(r.content)


class HttpWorker:
    """A plain HTTP worker: ``call(type, data) -> (status, data)``."""

    transport = "http"

    def __init__(self, url: str):
        self.http = _client(url)

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        r = self.http.post("/" + kind, json=data)
        return r.status_code, r.json()

    def get(self, path: str, **params):
        return self.http.get("/model-centric/" + path, params=params)

    def close(self):
        self.http.close()


class WsWorker(HttpWorker):
    """A plain WebSocket worker (downloads still go over HTTP, as in PyGrid)."""

    transport = "ws"

    def __init__(self, url: str, ws_url: str):
        from websockets.sync.client import connect

        super().__init__(url)
        self._cm = connect(ws_url, max_size=None, open_timeout=20)
        self.ws = self._cm.__enter__()
        self.lock = threading.Lock()

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        rid = uuid.uuid4().hex
        with self.lock:
            self.ws.send(json.dumps({"type": kind, "request_id": rid, "data": data}))
            reply = json.loads(self.ws.recv(timeout=60))
        assert reply.get("request_id") == rid
        assert reply.get("type") == kind
        body = reply["data"]
        return (200 if "error" not in body else 400), body

    def close(self):
        self._cm.__exit__(None, None, None)
        super().close()


class WsBinWorker(WsWorker):
    """A WebSocket worker that sends reports as binary frames (gridfl extension), built
    by hand from docs/protocol.md: 4-byte big-endian header length, the UTF-8 JSON header
    ``{"type", "request_id", "data": everything but diff}``, then the raw diff bytes."""

    transport = "wsbin"

    def __init__(self, url: str, ws_url: str):
        from websockets.sync.client import connect

        HttpWorker.__init__(self, url)
        self._cm = connect(
            ws_url, max_size=None, open_timeout=20, subprotocols=["gridfl.binary.2"]
        )
        self.ws = self._cm.__enter__()
        self.lock = threading.Lock()

    def call(self, kind: str, data: dict) -> tuple[int, dict]:
        if kind != "model-centric/report" or not isinstance(data.get("diff"), str):
            return super().call(kind, data)
        rid = uuid.uuid4().hex
        fields = {k: v for k, v in data.items() if k != "diff"}
        head = json.dumps({"type": kind, "request_id": rid, "data": fields}).encode()
        frame = len(head).to_bytes(4, "big") + head + base64.b64decode(data["diff"])
        with self.lock:
            self.ws.send(frame)
            reply = json.loads(self.ws.recv(timeout=60))
        assert reply.get("request_id") == rid
        assert reply.get("type") == kind
        body = reply["data"]
        return (200 if "error" not in body else body["status_code"]), body


def seat(node, name: str = "mnist", version: str | None = None) -> tuple[str, str]:
    """Authenticate and take a seat in the open cycle of a ``GridNode`` called directly (no
    transport): ``(worker_id, request_key)``; fails unless the node accepts."""
    from gridfl import _messages

    auth = node.authenticate(_messages.AuthenticateRequest(model_name=name))
    cyc = node.cycle_request(
        _messages.CycleRequest(worker_id=auth["worker_id"], model=name, version=version)
    )
    assert cyc["status"] == "accepted", cyc
    return auth["worker_id"], cyc["request_key"]


def join(worker, name="mnist", version="1.0", token=None, **speeds) -> tuple[str, dict]:
    """authenticate + cycle-request; returns (worker_id, cycle-request data)."""
    data = {"model_name": name}
    if version is not None:
        data["model_version"] = version
    if token is not None:
        data["auth_token"] = token
    st, auth = worker.call("model-centric/authenticate", data)
    assert st == 200, auth
    req = {"worker_id": auth["worker_id"], "model": name, **speeds}
    if version is not None:
        req["version"] = version
    st, cyc = worker.call("model-centric/cycle-request", req)
    assert st == 200, cyc
    return auth["worker_id"], cyc


def report(worker, worker_id: str, key: str, diff, **extra) -> tuple[int, dict]:
    if not isinstance(diff, (bytes, str)):
        diff = state.dumps(diff)
    if isinstance(diff, bytes):
        diff = b64(diff)
    return worker.call(
        "model-centric/report", {"worker_id": worker_id, "request_key": key, "diff": diff, **extra}
    )
