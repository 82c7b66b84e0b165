"""Helpers of the fault tests (tests/faults/): a throwaway PostgreSQL cluster that a test
may stop and start, and checks of what a node stored. The ``gridfl serve`` processes they
run are tests.harness.Serve."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.builders import postgres_test_url
from tests.harness import free_port


# --------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path:
    env = os.environ.get("GRIDFL_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not found:
        postgres_test_url()  # fails in CI, skips elsewhere
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
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


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
