"""
The asyncio shell of the worker SDK: :class:`AsyncSyft` and :class:`AsyncJob`.

All decisions live in :mod:`gridfl.client._base`; this module only awaits I/O. Example::

    import asyncio
    from gridfl import AsyncSyft

    async def main():
        async with AsyncSyft("ws://127.0.0.1:5000") as client:
            job = client.new_job("mnist", "1.0")

            @job.on("accepted")
            async def on_accepted(model, client_config):
                result = await job.train("training_plan", X, y)
                await job.report(model.create_serialized_diff(result.params),
                                 num_samples=result.num_samples)

            await job.start()

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from gridfl.client._base import START_DOC, BaseJob, BaseSyft
from gridfl.client._flow import drive_async, is_awaitable
from gridfl.client.trainer import TrainResult

__all__ = ["AsyncJob", "AsyncSyft"]


class AsyncJob(BaseJob):
    """One training job of an :class:`AsyncSyft` client (``await job.start()``).

    Event handlers may be plain functions or coroutine functions.
    """

    _client: AsyncSyft

    async def start(self, *, wait: float = 0.0) -> None:
        _, handlers, args = await drive_async(self._start_job(wait), self._client._perform)
        for handler in handlers:
            result = handler(*args)
            if is_awaitable(result):
                await result

    start.__doc__ = START_DOC

    async def report(
        self,
        diff: bytes,
        *,
        num_samples: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Send the serialized diff (``model.create_serialized_diff(params)``) to the node."""
        return await drive_async(
            self._report_flow(diff, num_samples, metrics), self._client._perform
        )

    async def report_metrics(
        self, num_samples: int, metrics: Mapping[str, float]
    ) -> dict[str, Any]:
        """Send the metrics of an evaluation cycle (see :meth:`Job.report_metrics`)."""
        return await drive_async(
            self._metrics_flow(num_samples, metrics), self._client._perform
        )

    async def train(self, plan_name: str, data: Any, target: Any, **options: Any) -> TrainResult:
        """Run the plan on ``data``/``target`` in a worker thread (see :meth:`trainer`).

        Trainer event handlers passed in ``events`` run in that thread.
        """
        trainer = self.trainer(plan_name, data, target, **options)
        return await asyncio.to_thread(trainer.run)


class AsyncSyft(BaseSyft):
    """Asyncio worker client of a grid node; see :class:`~gridfl.Syft` for the options.

    One WebSocket (for ``ws``/``wss`` URLs) and one HTTP connection pool are shared by
    every job of the client. Close it with ``await client.aclose()`` or ``async with``.
    ``transport=httpx.ASGITransport(app)`` talks to a node in the same process (see
    :class:`~gridfl.client._base.BaseSyft`).
    """

    def new_job(
        self,
        model_name: str,
        model_version: str | None = None,
        *,
        auth_token: str | None = None,
    ) -> AsyncJob:
        """A job for FL process ``model_name`` (``model_version``: latest when ``None``)."""
        return AsyncJob(self, model_name, model_version, auth_token=self._job_token(auth_token))

    async def _perform(self, op: Any) -> Any:
        return await self._net.perform(op)

    async def aclose(self) -> None:
        """Close the WebSocket and the HTTP connection pool."""
        await self._net.aclose()

    async def __aenter__(self) -> AsyncSyft:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
