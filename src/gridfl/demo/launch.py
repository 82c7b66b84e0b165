"""The demo's worker processes, forked from one process that imported the worker SDK.

Each worker started as ``python -m gridfl.demo.worker`` spent ~0.25 s of CPU importing
numpy, onnxruntime and the SDK before doing anything: ten of them were two of the CPU
seconds a demo needs before its first checkpoint, on a two-core machine. A
``multiprocessing`` fork server imports them once and forks every worker from itself,
so the imports are paid once and their memory pages are shared. The server is started
with the workers' environment (one onnxruntime and BLAS thread, the lean malloc) and
imports nothing else: it holds no threads when it forks.

Workers wait for :meth:`Workers.go` before opening their shard and joining::

    workers = Workers.start([["ws://127.0.0.1:5000", "mnist-2nn", "1", "shard-0"]],
                            env={"OMP_NUM_THREADS": "1"})     # doctest: +SKIP
    workers.go()                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WorkerProcess", "Workers", "compute_slots", "killed_on_error"]

# what every worker imports, at start or on its first cycle (the transports pull in
# httpx and websockets): imported once, in the server. gridfl.cli too: a forked child
# runs the main script again, and the `gridfl` console script imports the CLI.
_PRELOAD = ["gridfl.cli", "gridfl.demo.worker", "onnxruntime", "gridfl.plan", "gridfl.model",
            "gridfl.client._transports", "gridfl.client._compress", "gridfl.client.evaluation",
            "gridfl.client.speedtest", "websockets.sync.client"]


class WorkerProcess:
    """A forked worker, with the part of :class:`subprocess.Popen`'s interface the demo
    uses (``pid``, ``poll``, ``wait``, ``kill``)."""

    def __init__(self, process: Any) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("gridfl.demo.worker", timeout or 0)
        return int(self._process.exitcode)

    def kill(self) -> None:
        self._process.kill()


class Workers:
    """Worker processes forked from the fork server, and their start signal."""

    def __init__(self, processes: list[WorkerProcess], go: Any) -> None:
        self.processes, self._go = processes, go

    @classmethod
    def start(cls, argvs: Sequence[Sequence[str]], env: Mapping[str, str]) -> Workers:
        """Fork one worker per ``argvs`` entry (``gridfl.demo.worker``'s arguments).
        Where there is no fork server (Windows), each worker is spawned, importing alone."""
        forking = "forkserver" in multiprocessing.get_all_start_methods()
        ctx: Any = multiprocessing.get_context("forkserver" if forking else "spawn")
        go = ctx.Event()
        processes = []
        with _environment(env):  # read when each process (the server, or a worker) starts
            if forking:
                from multiprocessing import forkserver

                ctx.set_forkserver_preload(_PRELOAD)
                forkserver.ensure_running()  # once per demo process
            for argv in argvs:
                p = ctx.Process(target=_worker, args=(list(argv), go), daemon=False)
                p.start()
                processes.append(WorkerProcess(p))
        return cls(processes, go)

    def go(self) -> None:
        """Let every worker open its shard and join the node."""
        self._go.set()


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in os.environ while processes start (glibc and the BLAS read theirs when
    a process starts), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(argv: list[str], go: Any) -> None:
    """A forked worker: wait for the start signal, then run; end with the demo, whenever
    it ends (a worker on its own would retry a dead node forever)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    go.wait()
    from gridfl.demo.worker import main

    sys.exit(main(argv))


def _exit_with(parent_sentinel: int) -> None:
    """Wait for the demo process to end (killed, or crashed), then end this process."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


@contextlib.contextmanager
def compute_slots(n: int) -> Iterator[Path | None]:
    """A FIFO holding ``n`` slot bytes for the workers' ``ComputeSlots`` (None: no limit,
    when ``n`` is 0 or the platform has no FIFOs)."""
    if n <= 0 or not hasattr(os, "mkfifo"):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gridfl-slots-") as tmp:
        path = Path(tmp) / "slots"
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR)  # held open: the bytes live as long as the run
        try:
            os.write(fd, b"+" * n)
            yield path
        finally:
            os.close(fd)



@contextlib.contextmanager
def killed_on_error(procs: list[WorkerProcess]) -> Iterator[None]:
    """Kill ``procs`` if the block raises (workers would retry a dead node forever)."""
    try:
        yield
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        raise
