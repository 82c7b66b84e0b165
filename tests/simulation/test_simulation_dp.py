"""Differential privacy in the simulation against an independent numpy DP-FedAvg
(McMahan et al. 2018; Andrew et al. 2021 for the adaptive clip norm) and ε from
dp-accounting composed in the test.

The noise is under the test's control through the simulation's documented seeding: the
node's noise comes from ``default_rng([seed, 4])`` (docs/simulation.md), drawn once per
round as ``normal(0, z C, size=d)`` over the flat model, then the count's noise when the
clip norm is adaptive."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from gridfl._exceptions import ConfigError
from gridfl.simulation import SimulationOptions, partition, simulate
from tests.simulation.shared import CLIENT_CONFIG
from tests.simulation.test_simulation import _sgd_step

K, M, SEED = 40, 5, 7


def _rdp_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acct.get_epsilon(delta)


def _server_config(process, dp: dict) -> dict:
    return {**process["server_config"], "max_workers": M, "num_cycles": 6,
            "differential_privacy": {"population_size": K, "delta": 1e-4, **dp}}


def _reference(result, data, z, clip, adaptive=None):
    """DP-FedAvg recomputed from the rounds' drawn clients: diffs clipped (flat L2 over
    w and b) to C, summed, N(0, (z' C)^2) added, divided by m = M; with ``adaptive``,
    C <- C exp(-lr (b - target)), b = (unclipped - n/2 + N(0, s^2)) / m + 1/2 in [0, 1],
    and z' = (z^-2 - (2s)^-2)^-1/2 (Andrew et al., Theorem 1)."""
    x, y = data
    parts = partition(y, K, "iid", seed=SEED)
    rng = np.random.default_rng([SEED, 4])
    w, b = np.zeros((3, 1)), np.zeros(1)
    z_update = z if adaptive is None else (z**-2 - (2 * adaptive["count_stddev"]) ** -2) ** -0.5
    clips = []
    for entry in result.rounds:
        clips.append(clip)
        total, fit = np.zeros(4), 0
        for c in entry.clients:
            xc, yc = x[parts[c]].astype(np.float64), y[parts[c]].astype(np.float64)
            w_k, b_k = _sgd_step(w, b, xc, yc, CLIENT_CONFIG["lr"])
            flat = np.concatenate([(w - w_k).ravel(), (b - b_k).ravel()])
            norm = np.sqrt(np.sum(flat**2))
            fit += norm <= clip
            total += flat * min(1.0, clip / norm)
        total += rng.normal(0.0, z_update * clip, size=4)
        mean = total / M
        w, b = w - mean[:3].reshape(3, 1), b - mean[3:]
        if adaptive is not None:
            noisy = fit - len(entry.clients) / 2 + rng.normal(0.0, adaptive["count_stddev"])
            frac = min(1.0, max(0.0, noisy / M + 0.5))
            clip = clip * math.exp(-adaptive["learning_rate"]
                                   * (frac - adaptive["target_quantile"]))
    return w, b, clips


@pytest.mark.parametrize("adaptive", [None, {"initial": 0.05, "target_quantile": 0.5,
                                             "learning_rate": 0.3, "count_stddev": 2.0}],
                         ids=["fixed", "adaptive"])
def test_dp_simulation_equals_numpy_dp_fedavg_and_dp_accounting(process, data, adaptive):
    z = 0.8
    clip = 0.05 if adaptive is None else adaptive
    server_config = _server_config(process, {"noise_multiplier": z, "clip_norm": clip})
    result = simulate(**{**process, "server_config": server_config}, data=data,
                      options=SimulationOptions(num_clients=K, seed=SEED, workers=2))
    assert len(result.rounds) == 6
    w, b, clips = _reference(result, data, z, 0.05, adaptive)
    new_w, new_b = result.final_params
    np.testing.assert_allclose(new_w, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_b, b, rtol=1e-5, atol=1e-6)
    assert np.abs(w).sum() > 0.01
    for r, entry in enumerate(result.rounds, start=1):
        assert entry.privacy is not None
        assert entry.privacy["epsilon"] == pytest.approx(_rdp_epsilon(M / K, z, r, 1e-4),
                                                         rel=1e-9)
        assert entry.privacy["clip_norm"] == pytest.approx(clips[r - 1], rel=1e-9)
    if adaptive is not None:
        assert len(set(np.round(clips, 9))) > 1  # C moved


def test_clip_only_moves_each_client_by_at_most_c_over_m(process, data):
    """z = 0: ε is infinite (null in results.json) and the update is the clipped sum / m."""
    server_config = _server_config(process, {"noise_multiplier": 0.0, "clip_norm": 0.01})
    result = simulate(**{**process, "server_config": server_config}, data=data,
                      options=SimulationOptions(num_clients=K, seed=SEED, workers=2, rounds=2))
    w, b, _ = _reference(result, data, 0.0, 0.01)
    np.testing.assert_allclose(result.final_params[0], w, rtol=1e-5, atol=1e-7)
    assert result.rounds[0].privacy["epsilon"] is None
    moved = np.concatenate([w.ravel(), b.ravel()])
    assert np.linalg.norm(moved) <= 2 * 0.01 + 1e-9  # two rounds of at most m C / m


def test_simulation_stops_before_a_round_that_would_pass_max_epsilon(process, data):
    z, q = 1.0, M / K
    spent = [_rdp_epsilon(q, z, r, 1e-4) for r in range(1, 8)]  # spent[r - 1]: r rounds
    max_eps = (spent[2] + spent[3]) / 2
    last = next(r for r in range(1, 7) if spent[r] > max_eps)  # round r + 1 would pass
    assert last == 3
    server_config = _server_config(process, {"noise_multiplier": z, "clip_norm": 0.05,
                                             "max_epsilon": max_eps})
    server_config["num_cycles"] = 7
    result = simulate(**{**process, "server_config": server_config}, data=data,
                      options=SimulationOptions(num_clients=K, seed=SEED, workers=1))
    assert len(result.rounds) == last
    assert result.stop_reason is not None
    assert result.stop_reason.startswith("privacy budget spent")
    assert result.rounds[-1].privacy["epsilon"] <= max_eps


def test_a_population_the_accountant_is_not_told_of_is_refused(process, data):
    server_config = _server_config(process, {"noise_multiplier": 1.0, "clip_norm": 1.0})
    server_config["differential_privacy"]["population_size"] = 400
    with pytest.raises(ConfigError, match="population_size to num_clients"):
        simulate(**{**process, "server_config": server_config}, data=data,
                 options=SimulationOptions(num_clients=K, seed=SEED, workers=1))
