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
"""

from gridfl.client._async import AsyncJob, AsyncSyft
from gridfl.client._base import JOB_EVENTS, JobState
from gridfl.client._sync import Job, Syft
from gridfl.client.local_state import LocalState
from gridfl.client.speedtest import SpeedTestLimits, SpeedTestResult
from gridfl.client.trainer import TRAINER_EVENTS, PlanTrainer, TrainResult
from gridfl.client.worker import WorkerSummary, run_worker

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
