"""Early stop at a target accuracy: the round reported is the first round whose model a
numpy re-computation of the same FedAvg rounds puts at or above the target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gridfl._exceptions import ConfigError
from gridfl.simulation import SimulationOptions, partition, simulate
from tests.builders import linear_eval_plan
from tests.simulation.shared import FEATURES
from tests.simulation.test_simulation import _sgd_step

TOLERANCE = 0.5  # an example counts as right when the prediction is within this of y
LR = 0.05


def hit_rate_plan(features: int = FEATURES) -> bytes:
    """:func:`linear_eval_plan` plus an ``accuracy`` metric: the share of examples
    predicted within ``TOLERANCE`` of their target."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(linear_eval_plan(features))
    graph = model.graph
    graph.node.extend([
        helper.make_node("Constant", [], ["tol"],
                         value=helper.make_tensor("tol", TensorProto.FLOAT, [], [TOLERANCE])),
        helper.make_node("Less", ["abserr", "tol"], ["hit"]),
        helper.make_node("Cast", ["hit"], ["hit_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["hit_f"], ["accuracy"], keepdims=0),
    ])
    graph.output.append(helper.make_tensor_value_info("accuracy", TensorProto.FLOAT, []))
    meta = {p.key: p for p in model.metadata_props}
    outputs = json.loads(meta["gridfl.outputs"].value)
    meta["gridfl.outputs"].value = json.dumps(
        [*outputs, {"name": "accuracy", "role": "metric", "key": "accuracy"}])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference_accuracies(rounds, data, test_data, parts) -> list[float]:
    """Each round's model's share of test examples within TOLERANCE."""
    return [float(np.mean(hits)) for hits in reference_hits(rounds, data, test_data, parts)]


def reference_hits(rounds, data, test_data, parts) -> list[np.ndarray]:
    """Each round's model's hits (test examples within TOLERANCE), by FedAvg of one-step
    clients in float64 (McMahan et al., eq. 1): w <- sum_k n_k w_k / sum_k n_k."""
    x, y = (a.astype(np.float64) for a in data)
    xt, yt = (a.astype(np.float64) for a in test_data)
    w, b = np.zeros((FEATURES, 1)), np.zeros(1)
    accuracies = []
    for clients in rounds:
        steps = [_sgd_step(w, b, x[parts[c]], y[parts[c]], LR) for c in clients]
        n = [len(parts[c]) for c in clients]
        w = np.average([s[0] for s in steps], axis=0, weights=n)
        b = np.average([s[1] for s in steps], axis=0, weights=n)
        margin = np.abs(np.abs(xt @ w + b - yt) - TOLERANCE)
        assert margin.min() > 1e-4  # float32 and float64 agree on every example
        accuracies.append(np.abs(xt @ w + b - yt).reshape(-1) < TOLERANCE)
    return accuracies


@pytest.fixture(scope="module")
def run(process, data, test_data):
    """The process with the hit-rate evaluation plan; a 30-round run without a target
    gives the clients each round draws (the same for the same seed, target or not)."""
    proc = {**process, "plans": {**process["plans"], "evaluation_plan": hit_rate_plan()}}

    def go(**kw):
        opts = SimulationOptions(**{"num_clients": 40, "rounds": 30, "seed": 5,
                                    "workers": 2, **kw})
        return simulate(**proc, data=data, test_data=test_data, options=opts)

    full = go()
    parts = partition(data[1], 40, "iid", seed=5)
    accuracies = reference_accuracies([r.clients for r in full.rounds], data, test_data,
                                      parts)
    return go, full, accuracies


def test_near_the_target_an_evaluation_stops_once_the_target_is_out_of_reach(
        run, process, data, test_data, monkeypatch):
    """Batches of 10 of the 100 test examples: once near the target, a round's evaluation
    stops at the first batch after which even all the unread examples right could not
    reach the target, reporting that bound; the round that reaches it is still found."""
    monkeypatch.setattr("gridfl.client.evaluation.EVAL_BATCH", 10)
    go, full, accuracies = run
    hits = reference_hits([r.clients for r in full.rounds], data, test_data,
                          partition(data[1], 40, "iid", seed=5))
    target = max(accuracies)
    first = accuracies.index(target) + 1
    expected: list[dict[str, float]] = [{"accuracy": accuracies[0]}]  # not yet near: all
    for h in hits[1 : first - 1]:  # rounds 2 .. first - 1
        bounds = [(h[:seen].sum() + len(h) - seen) / len(h) for seen in range(10, 101, 10)]
        expected.append({"accuracy_at_most": next(b for b in bounds if b < target)})
    result = go(target_accuracy=target, near_target=1.0)
    assert result.target_round == first
    got = [r.central for r in result.rounds]
    assert [list(c) == ["accuracy_at_most"] for c in got] == [False] + [True] * (first - 2) + [
        False]
    for c, e in zip(got, expected, strict=False):
        key = next(iter(e))
        assert c[key] == pytest.approx(e[key], abs=1e-6)
    assert got[-1]["accuracy"] == pytest.approx(target)
    assert first > 2 and any(
        e["accuracy_at_most"] < target - 0.05 for e in expected[1:])  # some stopped early


def test_the_run_stops_at_the_first_round_that_reaches_the_target(run, tmp_path):
    go, full, accuracies = run
    assert [r.central["accuracy"] for r in full.rounds] == pytest.approx(accuracies)
    # a target first reached in the middle of the run
    target = sorted(set(accuracies))[len(set(accuracies)) // 2]
    first = next(i + 1 for i, a in enumerate(accuracies) if a >= target)
    assert 1 < first < 30
    result = go(target_accuracy=target, out_dir=tmp_path)
    assert result.target_round == first
    assert [r.round for r in result.rounds] == list(range(1, first + 1))
    assert "reached at round" in (result.stop_reason or "")
    # the model of the round that reached it, not of a round trained after it
    for got, want in zip(result.final_params, go(rounds=first).final_params, strict=True):
        np.testing.assert_array_equal(got, want)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["target_round"] == first
    assert saved["settings"]["target_accuracy"] == target


def test_sparse_evaluation_gets_dense_near_the_target(run):
    """Every 4th round while more than ``near_target`` below the target, then every
    round: the rounds evaluated follow from the reference accuracies alone."""
    go, _, accuracies = run
    target = max(accuracies)
    near = 0.1
    expected, last = [], None
    for r, a in enumerate(accuracies, start=1):
        if r % 4 == 0 or r == 30 or (last is not None and last >= target - near):
            expected.append(r)
            last = a
            if a >= target:
                break
    result = go(target_accuracy=target, evaluate_every=4, near_target=near)
    assert [r.round for r in result.rounds if r.central] == expected
    assert result.target_round == (expected[-1] if accuracies[expected[-1] - 1] >= target
                                   else None)


def test_an_unreached_target_runs_every_round(run):
    go, _, accuracies = run
    assert max(accuracies[:10]) < 0.95
    result = go(rounds=10, target_accuracy=0.95, evaluate_every=5)
    assert result.target_round is None and len(result.rounds) == 10
    assert [r.round for r in result.rounds if r.central] == [5, 10]


@pytest.mark.parametrize(("kw", "message"), [
    ({"target_accuracy": 1.5}, "target_accuracy must be a number from 0 to 1"),
    ({"target_accuracy": 0.9, "near_target": -0.1}, "near_target must be a number"),
])
def test_bad_targets_are_refused(process, data, test_data, kw, message):
    with pytest.raises(ConfigError, match=message):
        simulate(**process, data=data, test_data=test_data,
                 options=SimulationOptions(num_clients=40, workers=1, **kw))


def test_a_target_needs_test_data_and_an_accuracy(process, data, test_data):
    with pytest.raises(ConfigError, match="target_accuracy needs test_data"):
        simulate(**process, data=data, options=SimulationOptions(
            num_clients=40, workers=1, target_accuracy=0.9))
    with pytest.raises(ConfigError, match=r"reports 'accuracy'.*loss, mae"):
        simulate(**process, data=data, test_data=test_data, options=SimulationOptions(
            num_clients=40, workers=1, target_accuracy=0.9))
