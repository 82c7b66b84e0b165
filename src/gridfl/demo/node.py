"""The demo's grid node: a ``gridfl serve`` child process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gridfl._exceptions import GridflError

__all__ = ["LEAN_MALLOC", "node_process", "token_file", "wait_healthy"]

# glibc keeps freed multi-MB buffers (diffs, base64 text) in per-thread arenas; two arenas
# and a fixed mmap threshold hand them back to the system (docs/deployment.md).
LEAN_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def token_file(data_dir: Path, token: str) -> Path:
    """This run's admin token in ``data_dir/demo-admin-token``, mode 0600 (never printed:
    terminals and CI logs are kept)."""
    path = data_dir / "demo-admin-token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


@contextlib.contextmanager
def node_process(data_dir: Path, token: str) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """A grid node in its own process (its own GIL), on a free loopback port; yields its
    URL, its process and when it was started (``time.perf_counter``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data_dir / "gridfl.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)  # a fresh grid per run
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gridfl",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        env={**os.environ, **LEAN_MALLOC, "GRIDFL_ADMIN_TOKEN": token},
    )
    try:
        yield f"http://127.0.0.1:{port}", proc, started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GridflError(f"the grid node exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).is_success:
                return
        time.sleep(0.05)
    raise GridflError(f"the grid node did not answer on {url} within {timeout:.0f} s")
