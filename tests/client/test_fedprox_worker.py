"""FedProx end to end on a real node (uvicorn on loopback, SQLite and PostgreSQL): gridfl
workers (``run_worker``) train a plan compiled with ``proximal_mu``, binding the global
params to the downloaded checkpoint themselves, with mu from the node's strategy; each
checkpoint equals FedAvg of numpy FedProx runs from the paper's formula
(tests/_fedprox_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import _fedprox_reference as ref
from tests.harness import in_threads

pytest.importorskip("torch")

MU, LR, BATCH, STEPS = 0.5, 0.1, 8, 4


@pytest.fixture(scope="module")
def fedprox_process():
    # compiled with another mu: the node's strategy sets the one workers use
    plan, params, x, y = ref.compiled_two_nn(64, lr=LR, mu=0.01, seed=4)
    return plan.to_bytes(), params, (x[:32], y[:32]), (x[32:], y[32:])


def test_two_cycles_of_two_workers_equal_the_numpy_reference(server_factory, db_url,
                                                             fedprox_process):
    from gridfl.client import run_worker

    plan, w0, data_a, data_b = fedprox_process
    node = server_factory(db_url)
    name = node.host(
        plan=plan, params=w0,
        client_config={"lr": LR, "batch_size": BATCH, "max_updates": STEPS},
        server_config={"num_cycles": 2, "max_diffs": 2, "min_diffs": 2, "max_workers": 2,
                       "strategy": {"name": "fedprox", "proximal_mu": MU}},
    )
    status = node.status(name)
    assert status["strategy"]["name"] == "fedprox"

    def work(data, transport):
        summary = run_worker(node.url_for(transport), name, *data, model_version="1.0",
                             shuffle=False, max_wait=0.1)
        assert summary.finished and summary.cycles == 2

    in_threads(work, [(data_a, "ws"), (data_b, "http")])
    want = [np.asarray(p, np.float64) for p in w0]
    for number in (2, 3):
        runs = [ref.local_run(want, *d, lr=LR, mu=MU, batch_size=BATCH, steps=STEPS)
                for d in (data_a, data_b)]
        want = [(a + b) / 2 for a, b in zip(*runs, strict=True)]  # equal num_samples
        got = node.checkpoint(name, number)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # the proximal term mattered: plain FedAvg lands elsewhere
    runs = [ref.local_run(w0, *d, lr=LR, mu=0.0, batch_size=BATCH, steps=STEPS)
            for d in (data_a, data_b)]
    fedavg = [(a + b) / 2 for a, b in zip(*runs, strict=True)]
    got = node.checkpoint(name, 2)
    assert max(float(np.abs(g - f).max()) for g, f in zip(got, fedavg, strict=True)) > 1e-4
