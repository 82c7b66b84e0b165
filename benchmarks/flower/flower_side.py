"""Flower 1.42's side of benchmarks/bench_flower.py: one simulation, run in Flower's own
venv (benchmarks/flower/ensure-env), never in gridfl's.

    .venv-flower/bin/python benchmarks/flower/flower_side.py RUN.json

RUN.json (written by bench_flower) names a directory of ``.npy`` files (the data, the
clients' example indices and the initial model, all made by gridfl's side so both sides
start from the same partition and weights) and the settings: model, rounds, fraction,
batch size, learning rate, central evaluation on or off, SecAgg+ on or off. The result
is one JSON line on stdout: the wall-clock time (``time.time()``) when the first
aggregated model existed, the time each round ended (its central evaluation included,
when on), and the accuracies.

The legacy API (``LegacyContext`` + ``DefaultWorkflow``) runs both the plain and the
SecAgg+ rounds, since Flower's ``SecAggPlusWorkflow`` exists only there. Clients are
``NumPyClient`` s training with torch on one thread (one Ray actor per core).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation
from torch import nn

RUN = json.loads(Path(sys.argv[1]).read_text())
DATA = Path(RUN["data_dir"])
MARKS: dict[str, list[float]] = {"dispatched": [], "aggregated": [], "evaluated": []}
ACCURACY: list[float] = []


def build_model(name: str) -> nn.Module:
    """McMahan et al.'s 2NN and CNN, the same layers as gridfl.demo.models."""
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
        )
    return nn.Sequential(
        nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)
    )


def initial_weights() -> list[np.ndarray]:
    count = int(np.load(DATA / "params_count.npy"))
    return [np.load(DATA / f"param_{i}.npy") for i in range(count)]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


class MnistClient(NumPyClient):
    """One virtual client: E = 1 local epoch of SGD over its examples in full batches of
    B (a last partial batch is dropped and the weight is the examples trained, as
    gridfl's trainer and syft.js do)."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        x_all = np.load(DATA / "x_train.npy", mmap_mode="r")
        y_all = np.load(DATA / "y_train.npy", mmap_mode="r")
        x = torch.from_numpy(np.ascontiguousarray(x_all[self.indices]))
        y = torch.from_numpy(np.ascontiguousarray(y_all[self.indices]))
        model = build_model(RUN["model"])
        set_weights(model, parameters)
        opt = torch.optim.SGD(model.parameters(), lr=RUN["lr"])
        loss_fn = nn.CrossEntropyLoss()
        order, size = torch.randperm(len(x)), RUN["batch_size"]
        steps = len(x) // size  # full batches only, and weighted by them, as gridfl does
        for step in range(steps):
            batch = order[step * size:(step + 1) * size]
            opt.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            opt.step()
        return get_weights(model), steps * size, {}


def client_fn(context: Context):
    index = int(context.node_config["partition-id"])
    offsets = np.load(DATA / "offsets.npy", mmap_mode="r")
    indices = np.load(DATA / "indices.npy", mmap_mode="r")[offsets[index]:offsets[index + 1]]
    return MnistClient(np.asarray(indices)).to_client()


def central_evaluate(server_round: int, parameters, config):
    """On the 10k test set, 1,000 examples at a time as gridfl's evaluation (2 threads:
    the clients are idle between rounds)."""
    if server_round == 0:
        return None
    torch.set_num_threads(2)
    model = build_model(RUN["model"])
    set_weights(model, parameters)
    x = torch.from_numpy(np.load(DATA / "x_test.npy"))
    y = torch.from_numpy(np.load(DATA / "y_test.npy"))
    with torch.no_grad():
        right = sum(int((model(x[lo:lo + 1000]).argmax(1) == y[lo:lo + 1000]).sum())
                    for lo in range(0, len(x), 1000))
    accuracy = right / len(x)
    ACCURACY.append(accuracy)
    MARKS["evaluated"].append(time.time())
    return 0.0, {"accuracy": accuracy}


class TimedFedAvg(FedAvg):
    """FedAvg that notes when the first round is sent out and when each round's
    aggregated model exists."""

    def configure_fit(self, server_round, parameters, client_manager):
        if server_round == 1:  # the first round's clients are chosen and sent their task
            MARKS["dispatched"].append(time.time())
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        MARKS["aggregated"].append(time.time())
        return out


def main() -> None:
    strategy = TimedFedAvg(
        fraction_fit=RUN["fraction"], fraction_evaluate=0.0,
        min_fit_clients=2, min_evaluate_clients=0, min_available_clients=RUN["num_clients"],
        initial_parameters=ndarrays_to_parameters(initial_weights()),
        evaluate_fn=central_evaluate if RUN["evaluate"] else None,
    )
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=RUN["rounds"]),
                               strategy=strategy)
        secagg = RUN.get("secagg")
        if secagg:
            workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
                num_shares=secagg["num_shares"],
                reconstruction_threshold=secagg["threshold"]))
        else:
            workflow = DefaultWorkflow()
        workflow(grid, legacy)

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if RUN.get("secagg") else [])
    run_simulation(
        server_app=server, client_app=client, num_supernodes=RUN["num_clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": RUN["cpus"], "logging_level": "ERROR",
                                      "log_to_driver": False}},
    )
    print(json.dumps({"marks": MARKS, "accuracy": ACCURACY}), flush=True)


if __name__ == "__main__":
    main()
