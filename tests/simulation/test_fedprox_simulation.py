"""The simulation engine runs FedProx: the plan's global params are bound to each round's
params (by the worker trainer it shares with ``run_worker``), mu comes from the strategy,
and the rounds equal FedAvg of numpy FedProx runs (tests/_fedprox_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl.simulation import SimulationOptions, partition, simulate
from tests import _fedprox_reference as ref

pytest.importorskip("torch")

MU, LR, EPOCHS = 0.3, 0.2, 3


def test_fedprox_rounds_equal_the_numpy_reference():
    plan, w0, x, y = ref.compiled_two_nn(128, lr=LR, mu=MU, seed=7)
    # 16 examples a client, one batch of 16: each epoch is one full-batch step whatever
    # the shuffle, so E = 3 epochs are 3 FedProx steps around the round's params
    result = simulate(
        model=w0, plans={"training_plan": plan.to_bytes()},
        client_config={"name": "prox", "version": "1", "lr": LR, "batch_size": 16,
                       "max_epochs": EPOCHS},
        server_config={"num_cycles": 3, "max_diffs": 3,
                       "strategy": {"name": "fedprox", "proximal_mu": MU}},
        data=(x, y), options=SimulationOptions(num_clients=8, seed=3, workers=1),
    )
    parts = partition(y, 8, "iid", seed=3)
    w = [p.astype(np.float64) for p in w0]
    for entry in result.rounds:
        runs = []
        for c in entry.clients:
            xc, yc = x[parts[c]], y[parts[c]]
            anchor = [p.copy() for p in w]
            wk = [p.copy() for p in w]
            for _ in range(EPOCHS):
                wk = ref.fedprox_step(wk, anchor, xc.astype(np.float64), yc, LR, MU)
            runs.append(wk)
        w = [np.mean(ps, axis=0) for ps in zip(*runs, strict=True)]  # equal client sizes
    for got, want in zip(result.final_params, w, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(float(np.abs(a - b).max()) for a, b in zip(w, w0, strict=True)) > 0.05
