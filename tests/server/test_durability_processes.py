"""``server_config.durability: "cycle"`` with two server processes on one PostgreSQL
database, in process: two :class:`GridNode` objects (each its own instance, with its own
partial sums in memory) and no background tasks, so each step of closing a cycle is taken
by hand: the deadline, the other process writing its partial sums, the close timeout.
The real processes, with kill -9, are in tests/faults/test_durability_cycle_processes.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl import _messages, state
from gridfl._exceptions import ConflictError
from gridfl.server import GridNode, Settings
from gridfl.server import aggregate as agg
from gridfl.server.tables import cycle_partials, cycles
from tests.builders import diff_of, host_payload, model_params
from tests.harness import seat

pytestmark = pytest.mark.postgres

CLOSE_TIMEOUT = 5.0


@pytest.fixture
def two(pg_fresh_db, tmp_path):
    nodes = [
        GridNode(Settings(data_dir=tmp_path, database_url=pg_fresh_db, admin_token="x",
                          close_timeout=CLOSE_TIMEOUT))
        for _ in range(2)
    ]
    yield nodes
    for n in nodes:
        n.close()


def _host(node: GridNode, **server) -> None:
    node.host(host_payload(server_config={
        "min_diffs": 2, "max_diffs": 10, "durability": "cycle", "cycle_length": 60, **server,
    }))


def _report(node: GridNode, seed: int, taken: tuple[str, str] | None = None) -> None:
    taken = taken or seat(node, version="1.0")
    node.report(_messages.ReportRequest(*taken, state.dumps(diff_of(seed))))


def _cycle(node: GridNode):
    with node.engine.connect() as c:
        return c.execute(sa.select(cycles).order_by(cycles.c.id)).all()


def _written(node: GridNode) -> list[bool]:
    with node.engine.connect() as c:
        rows = c.execute(sa.select(cycle_partials.c.written_at)).scalars().all()
    return sorted(w is not None for w in rows)


def _statuses(node: GridNode) -> list[str]:
    return [c.status for c in _cycle(node)]


def test_the_deadline_gathers_both_processes_partial_sums(two):
    a, b = two
    _host(a)
    for i, node in enumerate((a, b, b)):
        _report(node, i)
    late = seat(b, version="1.0")
    first = _cycle(a)[0]
    marker = b.cycle_marker()
    # a sees the deadline: it writes its partial sums and waits for b's
    assert a.close_due_cycles(first.end_at + 1) == 1
    # what b polls when a NOTIFY is lost: it changes when a cycle starts closing
    assert b.cycle_marker() != marker
    closing = _cycle(a)[0]
    assert (closing.status, closing.closing_at is not None) == ("open", True)
    assert closing.end_at == pytest.approx(closing.closing_at + CLOSE_TIMEOUT)
    shown = a.status("mnist", "1.0")  # the status API says so; watchers still see it open
    assert [(c["status"], c.get("closing")) for c in shown["cycles"]] == [("open", True)]
    assert shown["current"]["closing"] is True
    assert _written(a) == [False, True]
    # a report that comes now is too late, as after a completion
    with pytest.raises(ConflictError, match="is closing"):
        _report(a, 9, late)
    # and nobody new is seated: the cycle has what it takes
    wid = a.authenticate(_messages.AuthenticateRequest(model_name="mnist"))["worker_id"]
    reply = a.cycle_request(_messages.CycleRequest(worker_id=wid, model="mnist", version="1.0"))
    assert (reply["status"], reply["reason"]) == ("rejected", "the cycle is closing")
    # b learns the cycle is closing (its wake-up), writes its sums, and completes it
    assert b.close_due_cycles() == 1
    assert _statuses(a) == ["completed", "open"]
    assert _written(a) == []
    new = state.loads(a.checkpoint("mnist", "1.0", "2"))
    for j, p in enumerate(model_params()):
        mean = sum(diff_of(i)[j].astype(np.float64) for i in range(3)) / 3
        np.testing.assert_allclose(new[j], p - mean, rtol=1e-5, atol=1e-6)


def test_a_partial_that_never_arrives_expires_the_cycle_at_close_timeout(two):
    a, b = two
    _host(a)
    _report(a, 0)
    _report(b, 1)  # and b never writes it (it died)
    first = _cycle(a)[0]
    a.close_due_cycles(first.end_at + 1)
    assert a.close_due_cycles(first.end_at + 1 + CLOSE_TIMEOUT / 2) == 0  # still waiting
    assert a.close_due_cycles(first.end_at + 2 + CLOSE_TIMEOUT) == 1
    rows = _cycle(a)
    assert [r.status for r in rows] == ["expired", "open"]
    assert rows[1].checkpoint_id == rows[0].checkpoint_id  # reopened on the same one
    assert _written(a) == []
    assert b.close_due_cycles() == 0  # b's late look finds the cycle gone and forgets it
    assert b.cycles.partials.held_ids() == []


def test_sums_that_disagree_with_their_count_expire_the_cycle_at_once(two):
    """b folded a report whose transaction then failed: its sums hold one report more
    than it committed. When the cycle closes, b cannot give sums that count exactly its
    committed reports, so it expires the cycle at once instead of waiting for the
    timeout."""
    a, b = two
    _host(a)
    _report(a, 0)
    _report(b, 1)
    first = _cycle(a)[0]
    with b.engine.connect() as conn:
        sums = b.cycles.partials.held(conn, first.id, agg.ModelSpec.of(model_params()))
    assert sums is not None and sums.count_x == 1
    sums.fold(diff_of(7))  # the fold of a transaction that rolled back
    a.close_due_cycles(first.end_at + 1)
    assert b.close_due_cycles() == 1
    assert _statuses(a) == ["expired", "open"]


def test_differential_privacy_clips_before_the_partial_sums(two):
    """Central DP with z = 0 over two processes' sums: the checkpoint is the current model
    minus the sum of the reports clipped to C, over the fixed denominator m (DP-FedAvg),
    with the clip applied in each process before its partial sum."""
    a, b = two
    c, m = 0.02, 3  # every report (L2 norm about 0.04) is clipped
    dp = {"noise_multiplier": 0.0, "clip_norm": c, "population_size": 100}
    _host(a, max_diffs=m, max_workers=m, differential_privacy=dp)
    _report(a, 0)
    _report(b, 1)
    _report(b, 2)  # the cycle is ready: b writes its sums and waits for a's
    assert _statuses(a) == ["open"]
    assert a.close_due_cycles() == 1
    assert _statuses(a) == ["completed", "open"]

    def clipped(d):
        norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in d))
        return [x.astype(np.float64) * min(1.0, c / norm) for x in d]

    new = state.loads(a.checkpoint("mnist", "1.0", "2"))
    for j, p in enumerate(model_params()):
        total = sum(clipped(diff_of(i))[j] for i in range(m))
        np.testing.assert_allclose(new[j], p - total / m, rtol=1e-5, atol=1e-6)
