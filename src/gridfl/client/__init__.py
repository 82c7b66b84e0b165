"""
The worker SDK: the seed's ``Syft`` / ``Job`` API (syft.js) in Python.

Its public names are re-exported at the package root (``from gridfl import Syft``);
this package adds the training helpers::

    Syft, Job                 blocking client and job (works inside Jupyter too)
    AsyncSyft, AsyncJob       the asyncio twins
    PlanTrainer, TrainResult  job.train's loop: batches, events, stop/resume, checkpoints
    run_worker                the whole worker loop in one call
    LocalState                what a worker keeps between cycles (FedBN buffers)
    SpeedTestLimits           bounds of the connection speed test

The names are imported on first use (PEP 562), so that a module of the package
(``gridfl.client.trainer``, which a simulated client runs) loads without the network
clients (httpx, websockets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gridfl._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:
    from gridfl.client._async import AsyncJob, AsyncSyft
    from gridfl.client._base import JOB_EVENTS, JobState
    from gridfl.client._sync import Job, Syft
    from gridfl.client.local_state import LocalState
    from gridfl.client.speedtest import SpeedTestLimits, SpeedTestResult
    from gridfl.client.trainer import TRAINER_EVENTS, PlanTrainer, TrainResult
    from gridfl.client.worker import WorkerSummary, run_worker

_LAZY = {
    "AsyncJob": "gridfl.client._async",
    "AsyncSyft": "gridfl.client._async",
    "JOB_EVENTS": "gridfl.client._base",
    "JobState": "gridfl.client._base",
    "Job": "gridfl.client._sync",
    "Syft": "gridfl.client._sync",
    "LocalState": "gridfl.client.local_state",
    "SpeedTestLimits": "gridfl.client.speedtest",
    "SpeedTestResult": "gridfl.client.speedtest",
    "TRAINER_EVENTS": "gridfl.client.trainer",
    "PlanTrainer": "gridfl.client.trainer",
    "TrainResult": "gridfl.client.trainer",
    "WorkerSummary": "gridfl.client.worker",
    "run_worker": "gridfl.client.worker",
}

__all__ = [
    "JOB_EVENTS",
    "TRAINER_EVENTS",
    "AsyncJob",
    "AsyncSyft",
    "Job",
    "JobState",
    "LocalState",
    "PlanTrainer",
    "SpeedTestLimits",
    "SpeedTestResult",
    "Syft",
    "TrainResult",
    "WorkerSummary",
    "run_worker",
]


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
