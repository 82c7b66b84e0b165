"""Where the clients run: a pool of local worker processes, or Ray tasks.

Both call the same client functions (:mod:`gridfl.simulation.clients`) and hand the
reports back in the order the clients were given, whatever order they finish in, so the
node's strategy folds them in the same order on every backend and every run.

* :class:`LocalPool`: one spawned process per core (default). Each opens the
  memory-mapped :class:`~gridfl.simulation.store.ShardStore` once; a task is a client
  index and a seed. The round's model is written once to a file the workers read.
* :class:`RayPool`: the examples and the clients' index arrays go to Ray's object store
  once; a task gets the client's indices and the round's model (one object per round).
  Connects to a running cluster with ``address`` (``ray.init(address=...)``), or starts a
  local Ray with ``num_cpus`` when none is running.
"""

from __future__ import annotations

import multiprocessing
import os
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
_job: ClientJob | None = None
_store: ShardStore | None = None
_params: tuple[str, list[np.ndarray]] = ("", [])


def _init_worker(job: ClientJob, store_dir: str) -> None:
    global _job, _store
    _job, _store = job, ShardStore(store_dir)


def _round_params(path: str) -> list[np.ndarray]:
    global _params
    if _params[0] != path:
        _params = (path, state.loads(Path(path).read_bytes()))
    return _params[1]


def _fit_task(task: tuple[str, int, int]) -> FitReport:
    path, client, seed = task
    assert _job is not None and _store is not None
    x, y = _store.train(client)
    return clients.fit(_job, client, _round_params(path), x, y, seed)


def _evaluate_task(task: tuple[str, int]) -> EvalReport:
    path, client = task
    assert _job is not None and _store is not None
    x, y = _store.held_out(client)
    return clients.evaluate(_job, client, _round_params(path), x, y)


class LocalPool:
    """``workers`` spawned processes on this machine (see the module docstring)."""

    def __init__(self, job: ClientJob, store: ShardStore, workers: int) -> None:
        self.store = store
        self._round = 0
        # one onnxruntime thread per process: the processes are the parallelism
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(job, str(store.directory)),
        )

    def _publish(self, params: Sequence[np.ndarray]) -> str:
        self._round += 1
        path = self.store.directory / f"params-{self._round}.state"
        path.write_bytes(state.dumps(list(params)))
        old = self.store.directory / f"params-{self._round - 2}.state"
        old.unlink(missing_ok=True)  # no worker reads it any more: each round waits
        return str(path)

    def fit(self, params: Sequence[np.ndarray], tasks: Sequence[tuple[int, int]]
            ) -> Iterator[FitReport]:
        path = self._publish(params)
        return self._pool.map(_fit_task, [(path, c, s) for c, s in tasks])

    def evaluate(self, params: Sequence[np.ndarray], chosen: Sequence[int]
                 ) -> Iterator[EvalReport]:
        path = self._publish(params)
        return self._pool.map(_evaluate_task, [(path, c) for c in chosen])

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
        return LocalPool(job, store, workers)
    if name == "ray":
        return RayPool(job, store, address=ray_address, num_cpus=workers)
    raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
