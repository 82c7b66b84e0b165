"""Running an evaluation plan on local examples: what a worker does in an evaluation
cycle (``job.evaluate``), and what a simulated client does in a federated evaluation.

    >>> import numpy as np
    >>> from gridfl.client.evaluation import EvaluationResult
    >>> EvaluationResult(num_samples=2, metrics={"accuracy": 0.5})
    EvaluationResult(num_samples=2, metrics={'accuracy': 0.5})
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError
from gridfl.plan import Plan

__all__ = ["EVAL_BATCH", "EvaluationResult", "batch_metrics", "evaluate_plan"]

#: examples per evaluation plan call: it bounds the memory of one call, which onnxruntime's
#: arena then keeps (the McMahan CNN: ~390 MB at 1000, ~75 MB at 250, for the same speed)
EVAL_BATCH = 250


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation's metrics (``loss`` among them when the plan outputs one), each the
    mean over ``num_samples`` examples: what ``job.report_metrics`` sends."""

    num_samples: int
    metrics: dict[str, float]


def evaluate_plan(plan: Plan, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                  client_config: dict[str, Any] | None = None) -> dict[str, float]:
    """The evaluation plan's ``loss`` and metrics over all of ``x``, each the mean over
    examples (batch means weighted by batch length)."""
    totals: dict[str, float] = {}
    for n, means in batch_metrics(plan, params, x, y, client_config):
        for key, mean in means.items():
            totals[key] = totals.get(key, 0.0) + mean * n
    return {k: v / len(x) for k, v in totals.items()}


def batch_metrics(plan: Plan, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                  client_config: dict[str, Any] | None = None
                  ) -> Iterator[tuple[int, dict[str, float]]]:
    """The plan run on ``x`` ``EVAL_BATCH`` examples at a time: each batch's length and
    its ``loss`` and metrics (batch means), as they come, so a caller can stop early."""
    if len(x) != len(y):
        raise ConfigError(
            f"evaluation needs as many targets as examples; got {len(x)} examples and "
            f"{len(y)} targets"
        )
    for lo in range(0, len(x), EVAL_BATCH):
        xb, yb = x[lo : lo + EVAL_BATCH], y[lo : lo + EVAL_BATCH]
        args: list[Any] = []
        for s in plan.inputs:
            if s.role == "data":
                args.append(xb)
            elif s.role == "target":
                args.append(yb)
            elif s.role == "model_param":
                args.append(params[s.required_index])
            elif s.role == "batch_size":
                args.append(len(xb))
            else:  # client_config
                args.append((client_config or {})[s.required_key])
        means: dict[str, float] = {}
        for s, value in zip(plan.outputs, plan.execute(*args), strict=True):
            key = "loss" if s.role == "loss" else s.key if s.role == "metric" else None
            if key is not None:
                means[key] = float(np.asarray(value).reshape(-1)[0])
        yield len(xb), means
