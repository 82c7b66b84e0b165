"""Where the clients run: a pool of local worker processes, or Ray tasks.

Both call the same client functions (:mod:`gridfl.simulation.clients`) and hand the
reports back in the order the clients were given, whatever order they finish in, so the
node's strategy folds them in the same order on every backend and every run.

* :class:`LocalPool`: one spawned process per core (default), started before the data
  is written (the processes import onnxruntime meanwhile). Each opens the run's
  memory-mapped :class:`~gridfl.simulation.store.ShardStore` and job on its first task;
  a task is the store's directory, a client index and a seed. The round's model is
  written once to a file the workers read.
* :class:`RayPool`: the examples and the clients' index arrays go to Ray's object store
  once; a task gets the client's indices and the round's model (one object per round).
  Connects to a running cluster with ``address`` (``ray.init(address=...)``), or starts a
  local Ray with ``num_cpus`` when none is running.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gridfl import state
from gridfl._exceptions import ConfigError
from gridfl.simulation import clients
from gridfl.simulation.clients import ClientJob, EvalReport, FitReport
from gridfl.simulation.store import ShardStore

__all__ = ["BACKENDS", "LocalPool", "RayPool", "open_backend"]

BACKENDS = ("local", "ray")

# ---------------------------------------------------------------- local pool (worker side)
_JOB_FILE = "job.pickle"
_run: tuple[str, ClientJob | None, ShardStore | None] = ("", None, None)
_params: tuple[str, list[np.ndarray]] = ("", [])


def _warm_up() -> None:
    """Import what a client runs (the pool's first task, while the data is written)."""
    import onnxruntime  # noqa: F401

    from gridfl.client import trainer  # noqa: F401


def _open_run(directory: str) -> tuple[ClientJob, ShardStore]:
    """The job and store of the run in ``directory``, opened once per process."""
    global _run
    if _run[0] != directory:
        job = pickle.loads((Path(directory) / _JOB_FILE).read_bytes())  # written by open()
        _run = (directory, job, ShardStore(directory))
    assert _run[1] is not None and _run[2] is not None
    return _run[1], _run[2]


def _round_params(path: str) -> list[np.ndarray]:
    global _params
    if _params[0] != path:
        _params = (path, state.loads(Path(path).read_bytes()))
    return _params[1]


def _fit_task(task: tuple[str, str, int, int]) -> FitReport:
    directory, path, client, seed = task
    job, store = _open_run(directory)
    x, y = store.train(client)
    return clients.fit(job, client, _round_params(path), x, y, seed)


def _evaluate_task(task: tuple[str, str, int]) -> EvalReport:
    directory, path, client = task
    job, store = _open_run(directory)
    x, y = store.held_out(client)
    return clients.evaluate(job, client, _round_params(path), x, y)


class LocalPool:
    """``workers`` spawned processes on this machine (see the module docstring): started
    at once, given their run (the job and the store in ``directory``) by :meth:`open`."""

    def __init__(self, directory: str | Path, workers: int) -> None:
        self.directory = Path(directory)
        self._round = 0
        # one onnxruntime thread per process: the processes are the parallelism
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._pool = ProcessPoolExecutor(workers,
                                         mp_context=multiprocessing.get_context("spawn"))
        for _ in range(workers):  # each submit starts one more process, up to workers
            self._pool.submit(_warm_up)

    def open(self, job: ClientJob, store: ShardStore) -> LocalPool:
        """Hand the workers their run: the job goes to a file beside the store."""
        if store.directory != self.directory:
            raise ValueError(f"the store must be in {self.directory}, not {store.directory}")
        self.store = store
        (self.directory / _JOB_FILE).write_bytes(pickle.dumps(job))
        return self

    def _publish(self, params: Sequence[np.ndarray]) -> str:
        self._round += 1
        path = self.directory / f"params-{self._round}.state"
        path.write_bytes(state.dumps(list(params)))
        old = self.directory / f"params-{self._round - 2}.state"
        old.unlink(missing_ok=True)  # no worker reads it any more: each round waits
        return str(path)

    def fit(self, params: Sequence[np.ndarray], tasks: Sequence[tuple[int, int]]
            ) -> Iterator[FitReport]:
        path = self._publish(params)
        d = str(self.directory)
        return self._pool.map(_fit_task, [(d, path, c, s) for c, s in tasks])

    def evaluate(self, params: Sequence[np.ndarray], chosen: Sequence[int]
                 ) -> Iterator[EvalReport]:
        path = self._publish(params)
        d = str(self.directory)
        return self._pool.map(_evaluate_task, [(d, path, c) for c in chosen])

    def pids(self) -> list[int]:
        return [p.pid for p in (self._pool._processes or {}).values() if p.pid is not None]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- Ray
def _ray_fit(job, params, x, y, idx, client, seed):  # a Ray task: arguments already resolved
    return clients.fit(job, client, params, np.asarray(x[idx]), np.asarray(y[idx]), seed)


def _ray_evaluate(job, params, x, y, idx, client):
    return clients.evaluate(job, client, params, np.asarray(x[idx]), np.asarray(y[idx]))


class RayPool:
    """The clients as Ray tasks (see the module docstring)."""

    def __init__(self, job: ClientJob, store: ShardStore, *, address: str | None = None,
                 num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                "the ray backend needs Ray: pip install 'gridfl[ray]'"
            ) from exc
        self._ray = ray
        if ray.is_initialized():
            pass  # the caller's ray.init (a cluster's address, a runtime_env) holds
        elif address:
            ray.init(address=address)  # a cluster: its resources are its own
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        self.store = store
        self._fit = ray.remote(num_cpus=1)(_ray_fit)
        self._evaluate = ray.remote(num_cpus=1)(_ray_evaluate)
        self._job = ray.put(job)
        self._x = ray.put(np.asarray(store.x))
        self._y = ray.put(np.asarray(store.y))

    def _ordered(self, refs: list[Any]) -> Iterator[Any]:
        for ref in refs:  # in the given order: the fold order is the clients' order
            yield self._ray.get(ref)

    def fit(self, params: Sequence[np.ndarray], tasks: Sequence[tuple[int, int]]
            ) -> Iterator[FitReport]:
        p = self._ray.put(list(params))
        s = self.store
        refs = [
            self._fit.remote(self._job, p, self._x, self._y,
                             np.asarray(s.index[s.offsets[c] : s.split[c]]), c, seed)
            for c, seed in tasks
        ]
        return self._ordered(refs)

    def evaluate(self, params: Sequence[np.ndarray], chosen: Sequence[int]
                 ) -> Iterator[EvalReport]:
        p = self._ray.put(list(params))
        s = self.store
        refs = [
            self._evaluate.remote(self._job, p, self._x, self._y,
                                  np.asarray(s.index[s.split[c] : s.offsets[c + 1]]), c)
            for c in chosen
        ]
        return self._ordered(refs)

    def pids(self) -> list[int]:
        return []  # tasks run in Ray's workers, possibly on other machines

    def close(self) -> None:
        pass  # the Ray runtime belongs to the caller (or to ray's own atexit)


def open_backend(name: str, job: ClientJob, store: ShardStore, *, workers: int,
                 ray_address: str | None = None) -> LocalPool | RayPool:
    if name == "local":
        return LocalPool(store.directory, workers).open(job, store)
    if name == "ray":
        return RayPool(job, store, address=ray_address, num_cpus=workers)
    raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
