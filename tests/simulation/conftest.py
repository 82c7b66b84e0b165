"""A tiny linear-regression process (the worker SDK tests' plan) and its data."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import linear_data, linear_eval_plan, linear_params, linear_sgd_plan
from tests.simulation.shared import CLIENT_CONFIG, FEATURES, SERVER_CONFIG


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
