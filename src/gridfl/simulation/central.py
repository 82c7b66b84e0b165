"""Central evaluation that stops once a target accuracy is out of reach.

Near a target, a run evaluates its model every round (see
:class:`~gridfl.simulation.SimulationOptions`), and for a model like McMahan's CNN that
evaluation costs about a third of the round's CPU. Only whether the target is reached
matters there, so the test set is read in batches and the evaluation stops as soon as
the accuracy over all of it can no longer reach the target, taking every example not yet
read as right: the round reached, or did not, exactly as a full evaluation would say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gridfl.client.evaluation import batch_metrics, evaluate_plan
from gridfl.plan import Plan

__all__ = ["AT_MOST", "evaluate_towards"]

#: the metric an evaluation stopped early reports: the accuracy over the whole test set
#: is at most this, and below the target
AT_MOST = "accuracy_at_most"


def evaluate_towards(plan: Plan, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                     client_config: dict[str, Any], target: float | None
                     ) -> dict[str, float]:
    """:func:`~gridfl.client.evaluation.evaluate_plan`'s metrics over all of ``x``; or,
    with a ``target``, ``{AT_MOST: bound}`` once the ``accuracy`` over all of ``x`` cannot
    reach it (``bound`` < ``target``: the examples read so far plus every other one right).
    """
    if target is None:
        return evaluate_plan(plan, params, x, y, client_config)
    totals: dict[str, float] = {}
    seen = 0
    for n, means in batch_metrics(plan, params, x, y, client_config):
        seen += n
        for key, mean in means.items():
            totals[key] = totals.get(key, 0.0) + mean * n
        if "accuracy" in totals:
            bound = (totals["accuracy"] + len(x) - seen) / len(x)
            if bound < target - 1e-12:  # the margin: float sums, not a real chance
                return {AT_MOST: bound}
    return {k: v / len(x) for k, v in totals.items()}
