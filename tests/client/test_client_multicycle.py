"""Several worker OS processes train a compiled plan over several cycles on a real node."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.builders import b64

from .worker_proc import CLASSES, FEATURES, blobs

torch = pytest.importorskip("torch")

WORKERS = 3
CYCLES = 3


def cross_entropy(params, x, y) -> float:
    w, b = params
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.slow
def test_workers_train_over_cycles(grid):
    """3 worker processes (SDK only, no torch), 3 cycles: every cycle makes a new
    checkpoint, and the held-out loss of the model goes down."""
    from gridfl import state
    from gridfl.compiler import SGD, compile_training_plan

    torch.manual_seed(0)
    net = torch.nn.Linear(FEATURES, CLASSES)
    x0, y0 = blobs(16, seed=99)
    plan = compile_training_plan(net, loss="cross_entropy", optimizer=SGD(lr=0.1),
                                 example_data=x0, example_target=y0)
    params = [p.detach().numpy().copy() for p in net.parameters()]
    name = grid.host(
        params=params,
        plan=plan.to_bytes(),
        client_config={"batch_size": 16, "lr": 0.1, "max_updates": 10},
        server_config={"cycle_length": 60, "num_cycles": CYCLES, "max_workers": WORKERS,
                       "max_diffs": WORKERS},
    )
    script = Path(__file__).with_name("worker_proc.py")
    urls = [grid.url_for("ws"), grid.url_for("http"), grid.url_for("ws")]
    procs = [
        subprocess.Popen([sys.executable, str(script), urls[i], name, str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(WORKERS)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    for o in outputs:
        assert o["finished"] and not o["torch_imported"], o
    assert sum(o["cycles"] for o in outputs) == CYCLES * WORKERS

    status = grid.status(name)
    assert [c["number"] for c in status["checkpoints"]] == list(range(1, CYCLES + 2))
    assert [c["status"] for c in status["cycles"]] == ["completed"] * CYCLES
    assert all(c["reported"] == WORKERS for c in status["cycles"])
    assert status["status"] == "finished"
    ckpts = [grid.checkpoint(name, n) for n in range(1, CYCLES + 2)]
    for before, after in itertools.pairwise(ckpts):
        assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    np.testing.assert_array_equal(ckpts[0][0], params[0])

    xt, yt = blobs(2000, seed=1000)
    losses = [cross_entropy(c, xt, yt) for c in ckpts]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses
    assert b64(state.dumps(ckpts[-1]))  # the final model round-trips through State
