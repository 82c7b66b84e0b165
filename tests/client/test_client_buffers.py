"""BatchNorm buffers over live cycles: averaged like params (the default) or kept on
each worker (FedBN), and optimizer state kept across cycles when the process asks."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import ConfigError, Syft
from gridfl.client import LocalState, run_worker
from tests.harness import in_threads

from .worker_proc import CLASSES, FEATURES, blobs

torch = pytest.importorskip("torch")

CYCLES, WORKERS, UPDATES = 3, 2, 4


@pytest.fixture(scope="module")
def bn_model():
    from gridfl.compiler import SGD, compile_training_plan, model_tensors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 6), torch.nn.BatchNorm1d(6),
                              torch.nn.ReLU(), torch.nn.Linear(6, CLASSES))
    x0, y0 = blobs(8, seed=99)
    plan = compile_training_plan(net, optimizer=SGD(lr=0.1, momentum=0.5),
                                 example_data=x0, example_target=y0)
    return plan, model_tensors(net)


def shard(worker: int):
    x, y = blobs(64, seed=worker)
    return x + 2.0 * worker, y  # each worker's features are shifted: its own statistics


def train(grid, name: str, tmp_path):
    """WORKERS threads, each its own client (and local state), CYCLES cycles; returns the
    clients and, per worker, the TrainResult of every cycle."""
    results: dict[int, list] = {w: [] for w in range(WORKERS)}
    clients = [Syft(grid.url_for("http"), local_state_dir=tmp_path / f"w{w}")
               for w in range(WORKERS)]

    def work(w: int) -> None:
        x, y = shard(w)
        run_worker(grid.url, name, x, y, model_version="1.0", client=clients[w],
                   shuffle=False, max_wait=0.2, min_wait=0.05, max_errors=20,
                   on_trained=lambda job, r: results[w].append(r))

    try:
        in_threads(work, [(w,) for w in range(WORKERS)])
    finally:
        for c in clients:
            c.close()
    assert [len(results[w]) for w in range(WORKERS)] == [CYCLES] * WORKERS
    return clients, results


def host(grid, plan, tensors, **config):
    return grid.host(
        params=tensors, plan=plan.to_bytes(),
        client_config={"batch_size": 16, "lr": 0.1, "max_updates": UPDATES, **config},
        server_config={"cycle_length": 60, "num_cycles": CYCLES, "max_workers": WORKERS,
                       "min_workers": WORKERS, "max_diffs": WORKERS},
    )


@pytest.mark.slow
def test_buffers_averaged_like_params(grid, bn_model, tmp_path):
    plan, tensors = bn_model
    n = plan.num_params
    name = host(grid, plan, tensors)
    _, results = train(grid, name, tmp_path)
    ckpts = [grid.checkpoint(name, k) for k in range(1, CYCLES + 2)]
    for cycle in range(CYCLES):
        # each cycle's checkpoint holds the mean of the workers' trained buffers
        for j in range(plan.num_buffers):
            trained = [results[w][cycle].buffers[j] for w in range(WORKERS)]
            mean = np.mean(np.stack(trained).astype(np.float64), axis=0)
            got = ckpts[cycle + 1][n + j]
            if got.dtype == np.int64:
                assert int(got) == round(float(mean))
            else:
                np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6)
    # a worker starts each cycle from the node's buffers: UPDATES steps per cycle
    assert int(ckpts[-1][-1]) == CYCLES * UPDATES


@pytest.mark.slow
def test_fedbn_buffers_stay_local(grid, bn_model, tmp_path):
    plan, tensors = bn_model
    n = plan.num_params
    name = host(grid, plan, tensors, buffers="local")
    _, results = train(grid, name, tmp_path)
    ckpts = [grid.checkpoint(name, k) for k in range(1, CYCLES + 2)]
    for ck in ckpts:  # the node never sees a worker's statistics
        for got, initial in zip(ck[n:], tensors[n:], strict=True):
            np.testing.assert_array_equal(got, initial)
    assert any(not np.allclose(a, b) for a, b in zip(ckpts[0][:n], ckpts[-1][:n],
                                                      strict=True))
    for w in range(WORKERS):
        kept = LocalState(tmp_path / f"w{w}").load(f"{name}:1.0")  # on disk, re-read
        last = results[w][-1].buffers
        for a, b in zip(kept.buffers, last, strict=True):
            np.testing.assert_array_equal(a, b)
        # the statistics carried on across the cycles: a count of every step it ran
        assert int(kept.buffers[-1]) == CYCLES * UPDATES
        assert not kept.optimizer_state  # not asked for
    # and they are each worker's own: worker 1's data is shifted, so are its statistics
    mean0 = LocalState(tmp_path / "w0").load(f"{name}:1.0").buffers[0]
    mean1 = LocalState(tmp_path / "w1").load(f"{name}:1.0").buffers[0]
    assert not np.allclose(mean0, mean1)


def test_local_options_are_validated(bn_model):
    from gridfl.client import PlanTrainer

    plan, tensors = bn_model
    x, y = shard(0)
    with pytest.raises(ConfigError, match="buffers must be one of aggregate, local"):
        PlanTrainer(plan, tensors, x, y, client_config={"lr": 0.1, "buffers": "fedbn"},
                    batch_size=8)
    with pytest.raises(ConfigError, match="keep_optimizer_state must be a bool"):
        PlanTrainer(plan, tensors, x, y,
                    client_config={"lr": 0.1, "keep_optimizer_state": "yes"}, batch_size=8)
    with pytest.raises(ConfigError, match="6 model params and 3 buffers but 6 model tensors"):
        PlanTrainer(plan, tensors[:6], x, y, client_config={"lr": 0.1}, batch_size=8)


def test_optimizer_state_kept_across_cycles_when_asked(bn_model):
    """Two trainers in a row on one LocalState continue one momentum run: the same as
    a single trainer running both epochs."""
    from gridfl.client import PlanTrainer

    plan, tensors = bn_model
    x, y = shard(1)
    cfg = {"lr": 0.1, "keep_optimizer_state": True, "buffers": "local"}
    store = LocalState()
    first = PlanTrainer(plan, tensors, x, y, client_config=cfg, batch_size=16,
                        local_state=store, process="p").run()
    params = first.params[:plan.num_params] + tensors[plan.num_params:]
    second = PlanTrainer(plan, params, x, y, client_config=cfg, batch_size=16,
                         local_state=store, process="p").run()
    both = PlanTrainer(plan, tensors, x, y, client_config=cfg, batch_size=16,
                       epochs=2).run()
    for a, b in zip(second.params[:plan.num_params], both.params[:plan.num_params],
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(second.buffers, both.buffers, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # FedBN: the result reports the buffers it was given, so their diff is zero
    for a, b in zip(second.params[plan.num_params:], tensors[plan.num_params:], strict=True):
        np.testing.assert_array_equal(a, b)
