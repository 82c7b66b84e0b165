"""What one virtual client does, the same for every backend: train or evaluate.

A client is not a process: :func:`fit` and :func:`evaluate` are plain functions a pool
worker (or a Ray task) calls with the client's examples. :func:`fit` runs the hosted
training plan through :class:`~gridfl.client.PlanTrainer` exactly as ``run_worker`` does
(``shuffle=True``, the process's ``client_config``) and returns the diff as the ``State``
bytes a worker reports (``SyftModel.create_serialized_diff``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gridfl.client.evaluation import evaluate_plan
from gridfl.model import SyftModel
from gridfl.plan import Plan

__all__ = ["ClientJob", "EvalReport", "FitReport", "evaluate", "fit"]

@dataclass(frozen=True)
class ClientJob:
    """What every client of a run shares (small and picklable: plan bytes, not sessions)."""

    training_plan: bytes
    evaluation_plan: bytes | None
    client_config: dict[str, Any]


@dataclass
class FitReport:
    """A client's report: the diff (``State`` bytes), its weight and last loss/metrics."""

    client: int
    diff: bytes
    num_samples: int
    loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    """A client's evaluation: metrics (``loss`` among them) over ``num_samples`` examples."""

    client: int
    num_samples: int
    metrics: dict[str, float]


_plans: dict[str, Plan] = {}  # this process's loaded plans, by SHA-256 of their bytes


def load_plan(data: bytes) -> Plan:
    """A plan loaded once per process (one onnxruntime thread: the pool is the parallelism)."""
    key = hashlib.sha256(data).hexdigest()
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = Plan.from_bytes(data, threads=1)
    return plan


def fit(
    job: ClientJob,
    client: int,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
) -> FitReport:
    """Train the client's examples from ``params``; return what ``run_worker`` reports."""
    from gridfl.client.trainer import PlanTrainer

    trainer = PlanTrainer(
        load_plan(job.training_plan), params, x, y,
        client_config=job.client_config, shuffle=True, seed=seed,
    )
    result = trainer.run()
    diff = SyftModel(params).create_serialized_diff(result.params)
    return FitReport(client, diff, result.num_samples, result.loss, dict(result.metrics))


def evaluate(
    job: ClientJob, client: int, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray
) -> EvalReport:
    """Run the hosted evaluation plan on the client's held-out examples."""
    assert job.evaluation_plan is not None  # checked before a run starts
    plan = load_plan(job.evaluation_plan)
    return EvalReport(client, len(x), evaluate_plan(plan, params, x, y, job.client_config))
