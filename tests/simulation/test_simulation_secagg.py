"""Secure aggregation in the simulation: every round's reports go through the four stages
of gridfl.secagg (the worker's and the node's own code), and the model moves by the
weighted mean of the clients' diffs within the quantization bound, against numpy FedAvg
recomputed here from the clients drawn."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl._exceptions import ConfigError
from gridfl.secagg import NodeSession
from gridfl.simulation import SimulationOptions, partition, simulate
from tests.simulation.test_simulation import _fedavg_reference

K, M, SEED = 40, 5, 5


def _secure(process, rounds: int, **secagg) -> dict:
    server_config = {**process["server_config"], "max_workers": M, "max_diffs": M,
                     "num_cycles": rounds,
                     "secure_aggregation": {"threshold": 3, "clipping_range": 1.0, **secagg}}
    return {**process, "server_config": server_config}


def _scale(bits: int, clipping_range: float = 1.0) -> float:
    """Quantization steps per unit (gridfl.secagg.quantize: (2**(B-1) - 1) / c)."""
    return (2 ** (bits - 1) - 1) / clipping_range


def test_secure_rounds_equal_numpy_fedavg_within_the_quantization_bound(
    process, data, monkeypatch
):
    masked: list[str] = []
    add = NodeSession.add_masked

    def counted(self, worker_id, msg):  # the node's own fold, counted
        masked.append(worker_id)
        return add(self, worker_id, msg)

    monkeypatch.setattr(NodeSession, "add_masked", counted)
    x, y = data
    result = simulate(**_secure(process, 3, quantization_bits=24), data=data,
                      options=SimulationOptions(num_clients=K, seed=SEED, workers=2))
    assert len(masked) == 3 * M  # every report was masked and summed by the node
    w, b = _fedavg_reference(result.rounds, x, y, partition(y, K, "iid", seed=SEED))
    new_w, new_b = result.final_params
    bound = 3 / _scale(24) + 1e-6  # one rounding error per round, and float32
    np.testing.assert_allclose(new_w, w, rtol=0, atol=bound)
    np.testing.assert_allclose(new_b, b, rtol=0, atol=bound)
    assert np.abs(w).sum() > 0.1  # the model moved: the comparison is not of zeros


def test_coarse_quantization_shows_within_its_bound_and_repeats_for_a_seed(process, data):
    """6-bit values (steps of 1/31): the round's mean is off the exact one by more than
    float noise, less than a step, and the same seed gives the same model."""
    x, y = data
    config = _secure(process, 1, quantization_bits=6)
    runs = [simulate(**config, data=data, options=SimulationOptions(
        num_clients=K, seed=SEED, workers=2)) for _ in range(2)]
    w, b = _fedavg_reference(runs[0].rounds, x, y, partition(y, K, "iid", seed=SEED))
    got = np.concatenate([np.ravel(p) for p in runs[0].final_params])
    exact = np.concatenate([w.ravel(), b.ravel()])
    error = np.abs(got - exact).max()
    assert 1e-5 < error <= 1 / _scale(6) + 1e-6, error
    for a, b_ in zip(runs[0].final_params, runs[1].final_params, strict=True):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize(
    ("extra", "options", "match"),
    [
        ({"differential_privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0,
                                   "population_size": K, "mode": "distributed",
                                   "delta": 1e-4}},
         {}, "with differential_privacy: not simulated yet"),
        ({}, {"clients_per_round": M + 1}, "more than the 5 workers a cycle takes"),
        ({}, {"clients_per_round": 2}, r"below secure aggregation's min_survivors \(3\)"),
    ],
)
def test_what_a_secure_simulation_cannot_run_is_refused(process, data, extra, options, match):
    config = _secure(process, 1)
    config["server_config"].update(extra)
    if "differential_privacy" in extra:  # hosting's rule: the range holds C plus the noise
        config["server_config"]["secure_aggregation"]["clipping_range"] = 4.0
    with pytest.raises(ConfigError, match=match):
        simulate(**config, data=data,
                 options=SimulationOptions(num_clients=K, seed=SEED, workers=1, **options))
