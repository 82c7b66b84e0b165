"""A simulation and a live node with worker processes give the same checkpoints."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gridfl.simulation import SimulationOptions, partition, simulate

CYCLES = 3
PER_CYCLE = 2


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "compression"), [
    (None, None),
    ({"name": "fedadam", "eta": 0.05}, None),  # state carried across rounds
    ({"name": "fedmedian"}, None),  # every diff kept
    (None, {"kind": "int8"}),  # the worker's encoding, the node's decoding
    ({"name": "fedmedian"}, {"kind": "topk", "fraction": 0.5}),
], ids=["fedavg", "fedadam", "fedmedian", "int8", "fedmedian-topk"])
def test_three_cycles_on_a_node_match_the_simulation(server, process, data, tmp_path,
                                                     strategy, compression):
    """Same seed, same clients, same report order: the node's checkpoint after 3 cycles
    equals the simulation's model after 3 rounds, within float32 rounding, whatever the
    strategy. Each client holds one batch, so a worker's training does not depend on its
    shuffle."""
    x, y = data
    server_config = {**process["server_config"], "num_cycles": CYCLES, "max_diffs": PER_CYCLE,
                     "max_workers": PER_CYCLE, "cycle_length": 120, "strategy": strategy,
                     "compression": compression}
    result = simulate(**{**process, "server_config": server_config}, data=data,
                      options=SimulationOptions(num_clients=40, seed=9, workers=2))
    assert len(result.rounds) == CYCLES
    parts = partition(y, 40, "iid", seed=9)
    drawn = [c for entry in result.rounds for c in entry.clients]
    # a fresh worker per report starts with no top-k residual: so does each client here
    assert len(set(drawn)) == len(drawn)

    server.host_client.host(**{**process, "server_config": server_config})
    name, version = process["client_config"]["name"], process["client_config"]["version"]
    # compressed reports travel only as binary WebSocket frames
    url = server.ws_url if compression else server.http_url
    for entry in result.rounds:
        for client in entry.clients:  # one worker process per client, in the drawn order
            shard = tmp_path / f"client-{client}.npz"
            np.savez(shard, x=x[parts[client]], y=y[parts[client]])
            done = subprocess.run(
                [sys.executable, "-m", "gridfl", "worker", url, name,
                 "--version", version, "--data", str(shard), "--cycles", "1"],
                capture_output=True, text=True, timeout=120,
            )
            assert done.returncode == 0, done.stderr[-2000:]
    assert server.host_client.status(name, version)["status"] == "finished"
    node_model = server.host_client.retrieve(name, version, CYCLES + 1)
    for a, b in zip(node_model, result.final_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.abs(node_model[0]).sum() > 0.1  # trained: not a comparison of zeros

