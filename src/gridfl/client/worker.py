"""
The usual worker loop as one call: join a cycle, train, report, repeat.

::

    from gridfl.client import run_worker

    summary = run_worker("ws://127.0.0.1:5000", "mnist", X, y, model_version="1.0")
    print(summary.cycles, "cycles, last loss", summary.last_loss)

One job is started again and again: it authenticates once and joins each next cycle as
the same worker, long-polling the node so it joins the moment a cycle opens. On
``accepted`` it trains the plan on the local data and reports the diff with the sample
count and the last loss/metrics. On ``rejected`` with a timeout it sleeps that long
(bounded by ``max_wait``) and tries again; a rejection without a timeout means the node
has nothing left to train, and the loop ends. Transient errors (network, node
unavailable) are retried with back-off up to ``max_errors`` times in a row; other errors
are raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gridfl._exceptions import (
    AuthenticationError,
    ConfigError,
    GridError,
    PermissionDeniedError,
    PlanError,
)
from gridfl.client._base import JobState
from gridfl.client._sync import Job, Syft
from gridfl.client.trainer import TrainResult

__all__ = ["WorkerSummary", "run_worker"]

logger = logging.getLogger("gridfl.client")


@dataclass
class WorkerSummary:
    """What :func:`run_worker` did: cycles trained and reported, rejections, losses."""

    cycles: int = 0
    rejections: int = 0
    errors: int = 0
    losses: list[float] = field(default_factory=list)
    #: evaluation cycles run and reported (with ``eval_data``), and their metrics
    evaluations: int = 0
    evaluation_metrics: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False  # the node said there is nothing left to train

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def run_worker(
    url: str,
    model_name: str,
    data: Any,
    target: Any,
    *,
    model_version: str | None = None,
    auth_token: str | None = None,
    plan_name: str = "training_plan",
    batch_size: int | None = None,
    epochs: int | None = None,
    max_updates: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    max_cycles: int | None = None,
    max_wait: float | None = None,
    min_wait: float = 0.2,
    max_errors: int = 5,
    long_poll: float = 30.0,
    on_trained: Callable[[Job, TrainResult], None] | None = None,
    eval_data: tuple[Any, Any] | None = None,
    client: Syft | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **client_options: Any,
) -> WorkerSummary:
    """Train on ``data``/``target`` for ``model_name`` until the node has nothing left.

    Args:
        url: the grid node; with ``auth_token`` and ``client_options`` passed to
            :class:`~gridfl.Syft` (unless an open ``client`` is given, which is then
            reused and not closed).
        model_name: the FL process to train (``model_version``: latest when ``None``).
        data: the local samples, first axis; ``target`` the labels.
        plan_name: the training plan to run (PyGrid's name is ``training_plan``).
        batch_size: passed to ``job.train``, as are ``epochs``, ``max_updates``,
            ``shuffle`` and ``seed``; ``None`` takes the cycle's ``client_config``.
            ``seed`` varies per cycle.
        max_cycles: stop after reporting this many cycles (``None``: until done).
        max_wait: cap on each sleep after a rejection (``None``: the node's timeout).
        min_wait: shortest sleep after a rejection (a timeout of 0 means "the cycle's
            deadline has passed; it will close soon").
        max_errors: failed rounds tolerated in a row before giving up.
        long_poll: seconds a gridfl node may hold a rejection until a cycle opens
            (``job.start(wait=...)``); a node that answers sooner (PyGrid) is retried
            after its ``timeout`` instead. ``0`` turns long-polling off.
        on_trained: called as ``on_trained(job, result)`` before each report.
        eval_data: ``(x, y)`` held-out examples: the worker then also takes evaluation
            cycles (``job.can_evaluate``), runs the hosted evaluation plan on them and
            reports the metrics (``summary.evaluations``); ``max_cycles`` counts
            training cycles only.

    Returns a :class:`WorkerSummary`. Authentication, permission, configuration and plan
    errors are raised at once; other node and network errors (e.g. a cycle that closed
    between acceptance and report) skip the round, and are raised after ``max_errors``
    in a row.
    """
    own = client is None
    if client is None:
        client = Syft(url, auth_token=auth_token, **client_options)
    summary = WorkerSummary()
    errors_in_row = 0
    job = client.new_job(model_name, model_version)
    job.can_evaluate = eval_data is not None
    try:
        while max_cycles is None or summary.cycles < max_cycles:
            asked = time.monotonic()
            try:
                job.start(wait=long_poll)  # the same job: the next cycle, same worker id
                if job.state is JobState.ACCEPTED and job.kind == "evaluation":
                    assert eval_data is not None  # only such a job is placed in one
                    evaluated = job.evaluate(*eval_data)
                    job.report_metrics(evaluated.num_samples, evaluated.metrics)
                elif job.state is JobState.ACCEPTED:
                    result = _train_and_report(
                        job, plan_name, data, target, on_trained,
                        batch_size=batch_size, epochs=epochs, max_updates=max_updates,
                        shuffle=shuffle, seed=None if seed is None else seed + summary.cycles,
                    )
            except (AuthenticationError, PermissionDeniedError, ConfigError, PlanError):
                raise  # retrying cannot help
            except GridError as exc:
                # a network failure, the node busy, or the cycle closed under us (late
                # download or report): skip this round and try again, a bounded number of
                # times in a row
                summary.errors += 1
                errors_in_row += 1
                if errors_in_row > max_errors:
                    raise
                delay = min(30.0, min_wait * 2 ** (errors_in_row - 1))
                logger.warning("worker: %s; retrying in %.1fs", exc, delay)
                sleep(delay)
                continue
            errors_in_row = 0

            if job.state is JobState.REPORTED and job.kind == "evaluation":
                summary.evaluations += 1
                summary.evaluation_metrics.append(dict(evaluated.metrics))
                logger.info("worker: evaluation reported, %s", evaluated.metrics)
                continue
            if job.state is JobState.REPORTED:
                summary.cycles += 1
                if result.loss is not None:
                    summary.losses.append(result.loss)
                logger.info("worker: cycle %d reported, loss %s", summary.cycles, result.loss)
                continue

            summary.rejections += 1
            timeout = job.timeout
            if timeout is None:
                summary.finished = True
                logger.info("worker: the node has nothing left to train")
                break
            if long_poll and time.monotonic() - asked >= long_poll:
                continue  # the node held the request the whole time: ask again at once
            wait = max(float(timeout), min_wait)
            if max_wait is not None:
                wait = min(wait, max_wait)
            logger.info("worker: rejected, retrying in %.1fs", wait)
            sleep(wait)
    finally:
        if own:
            client.close()
    return summary


def _train_and_report(
    job: Job,
    plan_name: str,
    data: Any,
    target: Any,
    on_trained: Callable[[Job, TrainResult], None] | None,
    **train_options: Any,
) -> TrainResult:
    result = job.train(plan_name, data, target, **train_options)
    if on_trained is not None:
        on_trained(job, result)
    assert job.model is not None
    diff = job.model.create_serialized_diff(result.params)
    metrics: dict[str, float] = dict(result.metrics)
    if result.loss is not None:
        metrics = {"loss": result.loss, **metrics}
    job.report(diff, num_samples=result.num_samples, metrics=metrics)
    return result
