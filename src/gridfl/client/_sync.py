"""
The blocking shell of the worker SDK: :class:`Syft` and :class:`Job`.

How the blocking API does its I/O, and why: the job flow (:mod:`gridfl.client._base`)
is I/O-free, and the sync shell drives it **in the calling thread**, handing each network
operation to the same asyncio transports :class:`~gridfl.AsyncSyft` uses, running on a
*private event loop in a background thread* owned by the client
(``asyncio.run_coroutine_threadsafe``). So:

* it works where an event loop is already running in the calling thread (Jupyter,
  IPython, an async application calling blocking code): nothing ever calls
  ``asyncio.run`` or touches the caller's loop;
* there is one implementation of each transport (WebSocket request matching, reconnect,
  retries, speed test), not a sync and an async copy that can drift apart;
* several threads can run jobs of one client at once: their requests share the client's
  single WebSocket and are matched by ``request_id`` on the I/O loop;
* event handlers and training run in the caller's thread, as users expect.

The alternative, sync transports (``httpx.Client`` + ``websockets.sync``), would need a
second WebSocket multiplexer with its own thread anyway, to match replies of concurrent
jobs; the private loop is the smaller, single-sourced design. The loop thread is a daemon
started on first use and stopped by :meth:`Syft.close` (or when the client is collected).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from gridfl._exceptions import ConfigError, GridflError
from gridfl.client._base import START_DOC, BaseJob, BaseSyft
from gridfl.client._flow import drive_sync, is_awaitable
from gridfl.client.trainer import TrainResult

__all__ = ["Job", "Syft"]

T = TypeVar("T")


class _IOLoop:
    """A private asyncio loop in a daemon thread that runs coroutines for blocking callers."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="gridfl-client-io", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise GridflError(
                "a blocking Syft call was made from the client's own I/O thread; "
                "use AsyncSyft in async code"
            )
        loop = self._ensure()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @property
    def started(self) -> bool:
        return self._loop is not None

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()


class Job(BaseJob):
    """One training job of a :class:`Syft` client.

    ``job.start()`` blocks until the node accepted or rejected the job and the
    corresponding handler returned. Handlers run in the calling thread.
    """

    _client: Syft

    def start(self, *, wait: float = 0.0) -> None:
        event, handlers, args = drive_sync(self._start_job(wait), self._client._perform)
        for handler in handlers:
            result = handler(*args)
            if is_awaitable(result):
                if hasattr(result, "close"):
                    result.close()
                raise ConfigError(
                    f"the {event!r} handler {handler!r} is a coroutine function; "
                    "use AsyncSyft for async handlers"
                )

    start.__doc__ = START_DOC

    def report(
        self,
        diff: bytes,
        *,
        num_samples: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Send the serialized diff (``model.create_serialized_diff(params)``) to the node.

        ``num_samples`` (used by the node to weight the average) and ``metrics`` (e.g.
        the last loss) are optional.
        """
        return drive_sync(self._report_flow(diff, num_samples, metrics), self._client._perform)

    def report_metrics(self, num_samples: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Send the metrics of an evaluation cycle (``job.kind == "evaluation"``),
        measured on ``num_samples`` held-out examples; no diff. The node averages them
        over the workers weighted by ``num_samples``::

            result = job.evaluate(x_test, y_test)  # doctest: +SKIP
            job.report_metrics(result.num_samples, result.metrics)  # doctest: +SKIP
        """
        return drive_sync(self._metrics_flow(num_samples, metrics), self._client._perform)

    def train(self, plan_name: str, data: Any, target: Any, **options: Any) -> TrainResult:
        """Run the plan ``plan_name`` on ``data``/``target``; see :meth:`trainer` for options.

        Returns a :class:`~gridfl.client.TrainResult`; ``result.params`` go to
        ``model.create_serialized_diff``.
        """
        return self.trainer(plan_name, data, target, **options).run()


class Syft(BaseSyft):
    """Blocking worker client of a grid node (the seed's ``Syft``).

    Example::

        from gridfl import Syft

        with Syft("ws://127.0.0.1:5000") as client:
            job = client.new_job("mnist", "1.0")

            @job.on("accepted")
            def on_accepted(model, client_config):
                result = job.train("training_plan", X, y)
                job.report(model.create_serialized_diff(result.params),
                           num_samples=result.num_samples)

            @job.on("rejected")
            def on_rejected(timeout):
                print("retry in", timeout, "s" if timeout is not None else "(done)")

            job.start()

    Options are those of :class:`~gridfl.client._base.BaseSyft` (``auth_token``,
    ``verbose``, ``allow_insecure``, ``timeout``, ``retries``, ``speed_test``,
    ``headers``, ``transport``). Works inside a running event loop (Jupyter); see the
    module docstring. ``transport=`` talks to a node in the same process, no socket::

        from starlette.testclient import TestClient  # runs the app's lifespan

        app = create_app(Settings(data_dir="grid-data"))
        with TestClient(app), Syft("http://localhost",
                                   transport=httpx.ASGITransport(app)) as client:
            ...
    """

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._io = _IOLoop()
        self._finalizer = weakref.finalize(self, self._io.stop)

    def new_job(
        self,
        model_name: str,
        model_version: str | None = None,
        *,
        auth_token: str | None = None,
    ) -> Job:
        """A job for FL process ``model_name`` (``model_version``: latest when ``None``).

        The job authenticates with ``auth_token``, or the client's token when ``None``.
        """
        return Job(self, model_name, model_version, auth_token=self._job_token(auth_token))

    def _perform(self, op: Any) -> Any:
        return self._io.run(self._net.perform(op))

    def close(self) -> None:
        """Close the WebSocket and HTTP connections and stop the I/O thread."""
        if self._io.started:
            try:
                self._io.run(self._net.aclose())
            finally:
                self._finalizer()

    def __enter__(self) -> Syft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
