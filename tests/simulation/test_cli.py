"""``gridfl simulate``: a run from a plan bundle, and bad input as one line and exit code 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gridfl import state
from gridfl.cli import main
from tests.builders import linear_data, linear_eval_plan, linear_params, linear_sgd_plan
from tests.simulation.shared import CLIENT_CONFIG, SERVER_CONFIG, without_timing


@pytest.fixture
def bundle(tmp_path):
    """A plan bundle as `gridfl compile` writes it, with data files beside it."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "training_plan.onnx").write_bytes(linear_sgd_plan(3))
    (folder / "evaluation_plan.onnx").write_bytes(linear_eval_plan(3))
    (folder / "model.pb").write_bytes(state.dumps(linear_params(3)))
    spec = {
        "model": "model.pb",
        "plans": {"training_plan": "training_plan.onnx",
                  "evaluation_plan": "evaluation_plan.onnx"},
        "client_config": CLIENT_CONFIG, "server_config": SERVER_CONFIG,
    }
    (folder / "bundle.json").write_text(json.dumps(spec))
    for name, seed in (("train", 0), ("test", 1)):
        x, y = linear_data(320 if name == "train" else 50, 3, seed=seed)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    x, y = linear_data(320, 3)
    np.savez(tmp_path / "wide.npz", x=np.hstack([x, x[:, :1]]), y=y)
    return folder


def _run(*args):
    return CliRunner().invoke(main, ["simulate", *map(str, args)])


def test_simulate_writes_results_and_plot(bundle, tmp_path):
    out = tmp_path / "out"
    r = _run(bundle, "--data", tmp_path / "train.npz", "--test", tmp_path / "test.npz",
             "--clients", 20, "--federated-every", 2, "--workers", 2, "--out", out)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert [e["round"] for e in results["rounds"]] == [1, 2]
    assert results["rounds"][1]["federated"]["loss"] > 0
    assert results["rounds"][1]["central"]["loss"] < results["rounds"][0]["train_loss"]
    assert (out / "results.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partitioner", "zipf"], "unknown partitioner 'zipf'"),
        (["--partitioner", "dirichlet", "--alpha", "0"], "alpha must be a number > 0"),
        (["--clients", "1000"], "1000 clients are more than the 320 examples"),
        (["--clients", "80"], "has 4 training examples, fewer than one batch of 8"),
        (["--data", "{tmp}/wide.npz"], "the training plan takes data of shape (N, 3)"),
        (["--federated-every", "0"], "federated_every must be an integer >= 1"),
        (["--evaluate-every", "0"], "evaluate_every must be an integer >= 1"),
        (["--partitioner", "no_such_module:f"], "cannot import f from no_such_module"),
        (["--backend", "dask"], "unknown backend 'dask'"),
        (["--target-accuracy", "2"], "target_accuracy must be a number from 0 to 1"),
        (["--target-accuracy", "0.9"], "target_accuracy needs test_data"),
        (["--target-accuracy", "0.9", "--test", "{tmp}/test.npz", "--clients", "20"],
         "an evaluation plan that reports 'accuracy'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_1(bundle, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    data = [] if "--data" in args else ["--data", tmp_path / "train.npz"]
    r = _run(bundle, *data, "--workers", 1, *args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_evaluation_without_an_evaluation_plan_is_refused(bundle, tmp_path):
    spec = json.loads((bundle / "bundle.json").read_text())
    del spec["plans"]["evaluation_plan"]
    (bundle / "bundle.json").write_text(json.dumps(spec))
    for extra in (["--test", tmp_path / "test.npz"], ["--federated-every", 1]):
        r = _run(bundle, "--data", tmp_path / "train.npz", *extra)
        assert r.exit_code == 1 and "evaluation needs an 'evaluation_plan'" in r.output, r.output
        assert "Traceback" not in r.output


def test_plans_of_the_wrong_kind_are_refused(bundle, tmp_path):
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["plans"]["training_plan"] = "evaluation_plan.onnx"
    (bundle / "bundle.json").write_text(json.dumps(spec))
    r = _run(bundle, "--data", tmp_path / "train.npz")
    assert r.exit_code == 1 and "plans.training_plan must be a training plan" in r.output, (
        r.output)


def test_a_bad_server_config_gets_the_nodes_own_message(bundle, tmp_path):
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["server_config"]["max_diffs"] = -2
    (bundle / "bundle.json").write_text(json.dumps(spec))
    r = _run(bundle, "--data", tmp_path / "train.npz")
    assert r.exit_code == 1 and "server_config.max_diffs must be an integer" in r.output, r.output


def test_a_user_partitioner_by_module_and_name(bundle, tmp_path, monkeypatch):
    (tmp_path / "my_splits.py").write_text(
        "import numpy as np\n"
        "def halves(labels, num_clients, rng):\n"
        "    return np.array_split(np.arange(len(labels)), num_clients)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    r = _run(bundle, "--data", tmp_path / "train.npz", "--clients", 10, "--partitioner",
             "my_splits:halves", "--rounds", 1, "--workers", 1, "--out", out)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["partitioner"] == "halves"
    assert len(results["rounds"][0]["clients"]) == 5


@pytest.mark.parametrize(
    ("evaluation", "drop_plan", "message"),
    [
        ({"every": 0}, False, "server_config.evaluation.every must be an integer >= 1"),
        ({"every": 1, "max_workers": 0}, False,
         "server_config.evaluation.max_workers must be an integer >= 1"),
        ({"every": 1}, True, "server_config.evaluation needs an evaluation plan"),
        ({"every": 1, "seat_timeout": 0.5}, False,
         "server_config.evaluation.seat_timeout must be"),
    ],
)
def test_a_bad_server_config_evaluation_is_one_line_and_exit_code_1(
    bundle, tmp_path, evaluation, drop_plan, message
):
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["server_config"]["evaluation"] = evaluation
    if drop_plan:
        del spec["plans"]["evaluation_plan"]
    (bundle / "bundle.json").write_text(json.dumps(spec))
    r = _run(bundle, "--data", tmp_path / "train.npz", "--workers", 1)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_server_config_evaluation_runs_a_federated_evaluation(bundle, tmp_path):
    spec = json.loads((bundle / "bundle.json").read_text())
    spec["server_config"]["evaluation"] = {"every": 2, "max_workers": 5}
    (bundle / "bundle.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    r = _run(bundle, "--data", tmp_path / "train.npz", "--clients", 20, "--workers", 1,
             "--out", out)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert [bool(e.get("federated")) for e in results["rounds"]] == [False, True]


def test_seat_timeout_is_validated_but_no_simulated_seat_lapses(bundle, tmp_path):
    """A simulated client always reports, so evaluation.seat_timeout (the node's guard
    against a worker that never reports) changes nothing: every drawn client is counted,
    and the rounds equal those of the same run without it."""
    spec = json.loads((bundle / "bundle.json").read_text())
    rounds = {}
    for timeout in (None, 1):
        spec["server_config"]["evaluation"] = {"every": 1, "max_workers": 5,
                                               "seat_timeout": timeout}
        (bundle / "bundle.json").write_text(json.dumps(spec))
        out = tmp_path / f"out-{timeout}"
        r = _run(bundle, "--data", tmp_path / "train.npz", "--clients", 20, "--workers", 1,
                 "--out", out)
        assert r.exit_code == 0, r.output
        rounds[timeout] = without_timing(json.loads((out / "results.json").read_text()))["rounds"]
    assert [len(e["evaluated"]) for e in rounds[1]] == [5, 5]
    assert rounds[1] == rounds[None]
