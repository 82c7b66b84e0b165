"""A tiny linear-regression process (the worker SDK tests' plan) and its data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.builders import linear_data, linear_eval_plan, linear_params, linear_sgd_plan

FEATURES = 3
CLIENT_CONFIG = {"name": "lin", "version": "1", "batch_size": 8, "lr": 0.05, "max_epochs": 1}
SERVER_CONFIG = {"num_cycles": 2, "max_diffs": 5}


@pytest.fixture(scope="session")
def process() -> dict:
    """Keyword arguments of ``simulate`` / ``HostClient.host`` for the linear model."""
    return {
        "model": linear_params(FEATURES),
        "plans": {"training_plan": linear_sgd_plan(FEATURES),
                  "evaluation_plan": linear_eval_plan(FEATURES)},
        "client_config": dict(CLIENT_CONFIG),
        "server_config": dict(SERVER_CONFIG),
    }


@pytest.fixture(scope="session")
def data() -> tuple[np.ndarray, np.ndarray]:
    return linear_data(320, FEATURES, seed=0)


@pytest.fixture(scope="session")
def test_data() -> tuple[np.ndarray, np.ndarray]:
    return linear_data(100, FEATURES, seed=1)


def without_timing(results: dict) -> dict:
    """results.json less the wall-clock fields, the only ones two same-seed runs differ in."""
    out = {k: v for k, v in results.items()
           if k not in ("startup_seconds", "total_seconds", "peak_memory_mb")}
    out["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in results["rounds"]]
    return json.loads(json.dumps(out))
