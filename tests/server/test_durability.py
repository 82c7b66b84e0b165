"""``server_config.durability: "cycle"`` in process (real SQLite, the node's own code
path): the running sums are never written, and the checkpoint is the same (weighted)
mean a numpy reference computes. The crash cases, with real processes, are in
tests/faults/test_durability_cycle.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl import _messages, state
from gridfl._exceptions import ConflictError
from gridfl.server import GridNode, Settings
from gridfl.server.tables import aggregates, cycles
from tests.builders import diff_of, host_payload, model_params
from tests.harness import seat

N = 3


@pytest.fixture
def node(tmp_path):
    n = GridNode(Settings(data_dir=tmp_path, admin_token="x"))
    yield n
    n.close()


def _stored_sums(node: GridNode) -> int:
    with node.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(aggregates)).scalar_one()


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "num_samples"])
def test_checkpoint_is_the_mean_and_no_sum_is_written(node, weighted):
    node.host(host_payload(server_config={"max_diffs": N, "durability": "cycle"}))
    weights = [3, 1, 6] if weighted else [None] * N
    for i, w in enumerate(weights):
        wid, key = seat(node, version="1.0")
        node.report(_messages.ReportRequest(wid, key, state.dumps(diff_of(i)), num_samples=w))
        if i < N - 1:
            assert _stored_sums(node) == 0  # the sums stay in memory
    new = state.loads(node.checkpoint("mnist", "1.0", "2"))
    scale = np.array(weights if weighted else [1] * N, np.float64)
    for j, p in enumerate(model_params()):
        stacked = np.stack([diff_of(i)[j].astype(np.float64) for i in range(N)])
        mean = np.tensordot(scale, stacked, axes=1) / scale.sum()
        np.testing.assert_allclose(new[j], p - mean, rtol=1e-5, atol=1e-6)


def test_report_after_a_restart_expires_the_cycle_and_is_refused(tmp_path):
    """A second node object on the same file (as a restarted process) has no sums for the
    cycle that committed reports: the first report it gets expires that cycle."""
    first = GridNode(Settings(data_dir=tmp_path, admin_token="x"))
    first.host(host_payload(server_config={"max_diffs": N, "durability": "cycle"}))
    seats = [seat(first, version="1.0") for _ in range(2)]
    first.report(_messages.ReportRequest(*seats[0], state.dumps(diff_of(0))))
    first.close()
    again = GridNode(Settings(data_dir=tmp_path, admin_token="x"))
    try:
        with pytest.raises(ConflictError, match="expired: the node restarted"):
            again.report(_messages.ReportRequest(*seats[1], state.dumps(diff_of(1))))
        cycles = again.status("mnist", "1.0")["cycles"]
        assert sorted((c["sequence"], c["status"]) for c in cycles) == [
            (1, "expired"),
            (2, "open"),
        ]
    finally:
        again.close()


def test_the_deadline_completes_from_the_sums_in_memory(node):
    node.host(
        host_payload(server_config={"min_diffs": 2, "max_diffs": 5, "durability": "cycle"})
    )
    for i in range(2):
        wid, key = seat(node, version="1.0")
        node.report(_messages.ReportRequest(wid, key, state.dumps(diff_of(i))))
    with node.engine.connect() as c:
        cycle_id = c.execute(sa.select(cycles.c.id).where(cycles.c.status == "open")).scalar_one()
    assert node.cycles.close_at_deadline(cycle_id, time.time() + 3600) == 1
    new = state.loads(node.checkpoint("mnist", "1.0", "2"))
    for j, p in enumerate(model_params()):
        mean = (diff_of(0)[j].astype(np.float64) + diff_of(1)[j]) / 2
        np.testing.assert_allclose(new[j], p - mean, rtol=1e-5, atol=1e-6)
