"""The simulation against numpy re-computations of the same rounds, and its determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gridfl.simulation import SimulationOptions, partition, simulate
from tests.simulation.shared import CLIENT_CONFIG, without_timing


def _sgd_step(w, b, x, y, lr):
    """One full-batch SGD step of the MSE loss mean((x w + b - y)^2), in float64."""
    err = x @ w + b - y
    g = 2.0 * err / len(x)
    return w - lr * (x.T @ g), b - lr * g.sum(axis=0)


def _fedavg_reference(rounds, x, y, parts, factor_of=lambda i: 1.0):
    """FedAvg (McMahan et al., eq. 1 as a diff) of one-step clients, in float64: each
    round w <- w - sum_k n_k s_k (w - w_k) / sum n_k, where the k-th client drawn sends
    s_k = ``factor_of(k)`` times its diff."""
    w, b = np.zeros((3, 1)), np.zeros(1)
    for entry in rounds:
        diffs_w, diffs_b, weights = [], [], []
        for i, c in enumerate(entry.clients):
            xc, yc = x[parts[c]].astype(np.float64), y[parts[c]].astype(np.float64)
            w_k, b_k = _sgd_step(w, b, xc, yc, CLIENT_CONFIG["lr"])
            diffs_w.append(factor_of(i) * (w - w_k))
            diffs_b.append(factor_of(i) * (b - b_k))
            weights.append(len(xc))
        w = w - np.average(diffs_w, axis=0, weights=weights)
        b = b - np.average(diffs_b, axis=0, weights=weights)
    return w, b


def test_fedavg_equals_numpy_fedavg_of_the_same_client_diffs(process, data):
    """Every client has one batch (8 examples, batch_size 8): one SGD step, whatever the
    shuffle. FedAvg (McMahan et al., eq. 1 as a diff): w <- w - sum_k n_k (w - w_k) / sum n_k."""
    x, y = data
    opts = SimulationOptions(num_clients=40, seed=5, workers=2)
    result = simulate(**process, data=data, options=opts)
    parts = partition(y, 40, "iid", seed=5)
    assert all(len(entry.clients) == 5 == len(set(entry.clients)) for entry in result.rounds)
    w, b = _fedavg_reference(result.rounds, x, y, parts)
    new_w, new_b = result.final_params
    np.testing.assert_allclose(new_w, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_b, b, rtol=1e-5, atol=1e-6)
    assert np.abs(w).sum() > 0.1  # the model moved: the comparison is not of zeros


def test_same_seed_same_results_json_on_any_number_of_workers(process, data, test_data,
                                                              tmp_path):
    runs = []
    for i, workers in enumerate((2, 1)):
        out = tmp_path / f"run{i}"
        opts = SimulationOptions(num_clients=20, partitioner="shards", seed=11, workers=workers,
                                 federated_every=1, held_out=0.25, out_dir=out)
        simulate(**{**process, "client_config": {**CLIENT_CONFIG, "batch_size": 4}},
                 data=data, test_data=test_data, options=opts)
        assert (out / "results.png").stat().st_size > 1000
        runs.append(json.loads((out / "results.json").read_text()))
    assert without_timing(runs[0]) == without_timing(runs[1])
    assert runs[0]["rounds"][-1]["central"]["loss"] > 0
    other = simulate(**process, data=data, options=SimulationOptions(
        num_clients=20, partitioner="shards", seed=12, workers=2))
    assert [r.clients for r in other.rounds] != [r["clients"] for r in runs[0]["rounds"]]


def test_federated_metrics_are_the_weighted_mean_of_the_clients_own(process, data):
    x, y = data
    opts = SimulationOptions(num_clients=16, rounds=1, seed=2, workers=2, federated_every=1,
                             federated_clients=6, held_out=0.25)
    # 320 / 16 = 20 examples a client: 5 held out, 15 trained (one batch of 8 used)
    result = simulate(**process, data=data, options=opts)
    entry = result.rounds[0]
    assert len(entry.evaluated) == 6
    w, b = (p.astype(np.float64) for p in result.final_params)
    parts = partition(y, 16, "iid", seed=2)
    mse, mae, n = [], [], []
    for c in entry.evaluated:
        idx = parts[c][-5:]
        err = x[idx] @ w + b - y[idx]
        mse.append(float(np.mean(err**2)))
        mae.append(float(np.mean(np.abs(err))))
        n.append(len(idx))
    assert entry.federated["loss"] == pytest.approx(np.average(mse, weights=n), rel=1e-5)
    assert entry.federated["mae"] == pytest.approx(np.average(mae, weights=n), rel=1e-5)


@pytest.mark.parametrize("extra", [
    {"mode": "async"},
], ids=["async"])
def test_what_a_simulation_cannot_run_is_refused_not_ignored(process, data, extra):
    from gridfl._exceptions import ConfigError

    server_config = {**process["server_config"], "max_workers": 5, **extra}
    if "mode" in extra:
        server_config = {"mode": "async", "num_cycles": 2}
    with pytest.raises(ConfigError, match=f"{next(iter(extra))}: not simulated yet"):
        simulate(**{**process, "server_config": server_config}, data=data,
                 options=SimulationOptions(num_clients=40, seed=5, workers=1))


@pytest.mark.parametrize(("attack", "factor"), [("scale", 100.0), ("signflip", -1.0)])
def test_byzantine_clients_report_the_demo_workers_poisoned_diff(process, data, attack,
                                                                 factor):
    """The first 2 clients drawn each round send factor x their diff (as ``gridfl demo
    --attack`` workers do); FedAvg then takes the weighted mean of what was sent."""
    x, y = data
    opts = SimulationOptions(num_clients=40, seed=5, workers=1, byzantine=2, attack=attack)
    result = simulate(**process, data=data, options=opts)
    parts = partition(y, 40, "iid", seed=5)
    w, b = _fedavg_reference(result.rounds, x, y, parts,
                             factor_of=lambda i: factor if i < 2 else 1.0)
    new_w, new_b = result.final_params
    np.testing.assert_allclose(new_w, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new_b, b, rtol=1e-4, atol=1e-5)
    clean = simulate(**process, data=data, options=SimulationOptions(num_clients=40, seed=5,
                                                                     workers=1))
    assert not np.allclose(clean.final_params[0], new_w)  # the attack changed the model


@pytest.mark.parametrize(("extra", "message"), [
    ({"byzantine": 6}, "byzantine must be an integer from 0 to clients_per_round"),
    ({"byzantine": -1}, "byzantine must be an integer from 0"),
    ({"byzantine": 1, "attack": "flood"}, "attack must be one of scale, signflip, noise"),
])
def test_bad_byzantine_options_are_refused(process, data, extra, message):
    from gridfl._exceptions import ConfigError

    with pytest.raises(ConfigError, match=message):
        simulate(**process, data=data,
                 options=SimulationOptions(num_clients=40, seed=5, workers=1, **extra))


def test_reports_the_node_would_refuse_are_left_out(process, data):
    """lr 1e8: round 1's diffs are large (~1e8) but within the node's bound (±1e12);
    round 2's, from that model, are beyond it. The node answers such a report with a 400;
    the simulation leaves it out the same way, and a round with every report refused
    keeps the model."""
    huge = {**process, "client_config": {**CLIENT_CONFIG, "lr": 1e8}}
    one = simulate(**huge, data=data, options=SimulationOptions(
        num_clients=40, seed=5, workers=1, rounds=1))
    two = simulate(**huge, data=data, options=SimulationOptions(
        num_clients=40, seed=5, workers=1, rounds=2))
    assert one.rounds[0].refused == [] and one.rounds[0].error is None
    assert np.isfinite(one.final_params[0]).all() and np.abs(one.final_params[0]).max() > 1e6
    assert two.rounds[1].refused == two.rounds[1].clients
    assert "every report was refused" in two.rounds[1].error
    for kept, before in zip(two.final_params, one.final_params, strict=True):
        np.testing.assert_array_equal(kept, before)


def test_compressed_reports_keep_each_clients_error_feedback():
    """Top-k with error feedback per virtual client (Stich et al.): what a client's report
    leaves out is added to that client's next diff, not to another client's; the node
    decodes exactly the top-k of diff + residual (reference: tests/_compression_ref.py)."""
    from gridfl.server.aggregate import ModelSpec
    from gridfl.simulation.compress import SimulatedCompression
    from tests._compression_ref import ref_topk

    rng = np.random.default_rng(3)
    shapes = [(4, 3), (5,)]
    sim = SimulatedCompression({"kind": "topk", "fraction": 0.25},
                               ModelSpec.of([np.zeros(s, np.float32) for s in shapes]))
    residuals: dict[int, list[np.ndarray]] = {}
    for client in (1, 2, 1, 1, 2):
        diff = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        carried = [d.astype(np.float64) + r
                   for d, r in zip(diff, residuals.get(client, [0.0, 0.0]), strict=True)]
        want = ref_topk(carried, 0.25)
        got = sim.report(client, diff)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        residuals[client] = [c - w for c, w in zip(carried, want, strict=True)]
        flat_left = np.concatenate([r.ravel() for r in residuals[client]])
        np.testing.assert_allclose(sim.residual(client), flat_left, rtol=1e-6, atol=1e-6)
    assert sim.bytes_sent == 5 * (4 + 8 * 5)  # count, then 5 (index, value) pairs of 4 bytes


def test_int8_reports_fold_what_the_node_decodes():
    from gridfl.server.aggregate import ModelSpec
    from gridfl.simulation.compress import SimulatedCompression
    from tests._compression_ref import ref_int8

    diff = [np.array([[0.5, -1.27], [0.01, 0.0]], np.float32), np.array([3.0], np.float32)]
    sim = SimulatedCompression({"kind": "int8"}, ModelSpec.of([np.zeros_like(d) for d in diff]))
    for g, w in zip(sim.report(0, diff), ref_int8(diff), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    assert sim.residual(0) is None
