"""Helpers of the fault and load tests (tests/faults/, tests/load/): real ``gridfl serve``
processes, a throwaway PostgreSQL cluster that a test may stop and start, fresh databases
on the shared test cluster, and an asyncio protocol client for hundreds of workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server.conftest import ADMIN, free_port

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- grid node process
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


@pytest.fixture
def serve_factory(tmp_path):
    started: list[Serve] = []

    def start(database_url: str, **kw) -> Serve:
        s = Serve(database_url, tmp_path, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# --------------------------------------------------------------------------- PostgreSQL
def _pg_base_url() -> str:
    url = os.environ.get("GRIDFL_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("GRIDFL_TEST_POSTGRES_URL is not set in CI: PostgreSQL tests must run")
        pytest.skip("no PostgreSQL: run under `make test` or `. scripts/ensure-postgres`")
    return url


@pytest.fixture
def pg_fresh_db():
    """A new, empty database on the shared test cluster (dropped afterwards)."""
    import sqlalchemy as sa

    url = sa.make_url(_pg_base_url())
    name = f"gridfl_f_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _pg_bin() -> Path:
    env = os.environ.get("GRIDFL_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not found:
        _pg_base_url()  # fails in CI, skips elsewhere
        pytest.skip("no PostgreSQL binaries")
    return found[-1]


class PgCluster:
    """A private PostgreSQL cluster in a temp dir on its own port, so a test can stop and
    start it without disturbing the shared test cluster (``scripts/ensure-postgres``)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="gridfl-pgx-"))
        self.port = free_port()
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(self.dir, "postgres")
        self._as("initdb", "-D", str(self.dir / "data"), "-U", "gridfl", "--auth=trust",
                 "--no-sync")
        self.url = f"postgresql+psycopg://gridfl@127.0.0.1:{self.port}/postgres"
        self.start()

    def _as(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        self._as("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                 "-c max_connections=300 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg_cluster():
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


# --------------------------------------------------------------------------- checks
def assert_mean_applied(new, base, diffs, rtol=1e-5, atol=1e-6) -> None:
    """``new == base - mean(diffs)``: every diff counted exactly once."""
    for j, p in enumerate(base):
        mean = np.mean(np.stack([d[j].astype(np.float64) for d in diffs]), axis=0)
        np.testing.assert_allclose(new[j], p - mean, rtol=rtol, atol=atol)


def wait_until(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
