"""Secure aggregation across server processes and a ``kill -9`` (``gridfl serve`` as real
processes on one SQLite file or PostgreSQL database): the stage state is in the database,
so after a crash in any stage another process takes over and the cycle completes once,
with the sum of the workers' quantized diffs."""

from __future__ import annotations

import sqlite3

import pytest

from gridfl.secagg import SecAggParams
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import encode
from tests.builders import diff_of, host_payload
from tests.harness import Admin
from tests.secagg._drive import Driver, assert_weighted_mean_step

CONFIG = {
    "max_workers": 3,
    "max_diffs": 3,
    "secure_aggregation": {"threshold": 2, "clipping_range": 0.5},
}


@pytest.mark.parametrize("crash_after", [m.ADVERTISE, m.SHARE, m.MASKED])
def test_kill9_in_any_stage_then_another_process_completes_the_cycle(
    serve_factory, shared_db, crash_after
):
    first = serve_factory(shared_db)
    second = serve_factory(shared_db)  # a second process on the same database
    admin = Admin(first.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(first.url if i % 2 else second.url, params) for i in range(3)]
    diffs = [diff_of(i) for i in range(3)]

    def crash_point(stage):
        if stage == crash_after:
            first.kill9()
            for w in workers:
                w.move_to(second.url)

    for w in workers:
        w.ok(m.ADVERTISE, w.session.advertise().to_json())
    crash_point(m.ADVERTISE)
    for w in workers:
        roster = m.Roster.from_json(w.ok(m.SHARE)["message"])
        w.ok(m.SHARE, w.session.share_keys(roster).to_json())
    crash_point(m.SHARE)
    for i, w in enumerate(workers):
        forwarded = m.EncryptedShares.from_json(w.ok(m.MASKED)["message"])
        vec = encode(diffs[i], 10 + i, params)
        w.ok(m.MASKED, w.session.masked_vector(forwarded, vec).to_json())
    crash_point(m.MASKED)
    for w in workers:
        request = m.UnmaskRequest.from_json(w.ok(m.UNMASK)["message"])
        w.ok(m.UNMASK, w.session.unmask(request).to_json())

    admin = Admin(second.url)
    status = admin.status()
    assert [(c["sequence"], c["status"]) for c in status["cycles"]] == [
        (1, "completed"),
        (2, "open"),
    ], status
    assert [c["number"] for c in status["checkpoints"]] == [1, 2]
    original, new = admin.checkpoint(1), admin.checkpoint(2)
    assert_weighted_mean_step(original, new, diffs, [10, 11, 12], params)


# ------------------------------------------------- durability "cycle": the sum in memory


def _masked_rows(db_path) -> int:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT count(*) FROM secagg_totals").fetchone()[0]


def _through_masked(workers, diffs, params, after_share=lambda: None) -> None:
    """Every worker advertises, shares and sends its masked input (weights 10, 11...)."""
    for w in workers:
        w.ok(m.ADVERTISE, w.session.advertise().to_json())
    for w in workers:
        roster = m.Roster.from_json(w.wait_for(m.SHARE)["message"])
        w.ok(m.SHARE, w.session.share_keys(roster).to_json())
    after_share()
    for i, w in enumerate(workers):
        forwarded = m.EncryptedShares.from_json(w.wait_for(m.MASKED)["message"])
        vec = encode(diffs[i], 10 + i, params)
        w.ok(m.MASKED, w.session.masked_vector(forwarded, vec).to_json())


def _cycle_node(serve_factory, tmp_path):
    """One ``gridfl serve`` on SQLite hosting CONFIG with durability "cycle", and three
    accepted workers."""
    node = serve_factory(f"sqlite:///{tmp_path / 'grid.db'}")
    admin = Admin(node.url)
    config = {**CONFIG, "durability": "cycle"}
    assert admin.host(host_payload(server_config=config)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    return node, admin, params, [Driver(node.url, params) for _ in range(3)]


def _unmask_and_check_the_mean(admin, workers, diffs, params) -> None:
    """Every worker answers the unmask stage; then checkpoint 2 is checkpoint 1 stepped by
    the weighted mean of ``diffs`` (weights 10, 11...), from one more completed cycle."""
    for w in workers:
        w.answer_unmask()
    status = admin.status()
    assert [c["number"] for c in status["checkpoints"]] == [1, 2]
    assert [c["status"] for c in status["cycles"]][-2:] == ["completed", "open"], status
    weights = [10 + i for i in range(len(diffs))]
    assert_weighted_mean_step(admin.checkpoint(1), admin.checkpoint(2), diffs, weights, params)


def test_durability_cycle_keeps_the_masked_sum_in_memory(serve_factory, tmp_path):
    _, admin, params, workers = _cycle_node(serve_factory, tmp_path)
    diffs = [diff_of(i) for i in range(3)]
    _through_masked(workers, diffs, params)
    assert _masked_rows(tmp_path / "grid.db") == 0  # three inputs folded, never written
    _unmask_and_check_the_mean(admin, workers, diffs, params)


def test_durability_cycle_kill9_before_any_masked_input_loses_nothing(serve_factory, tmp_path):
    node, admin, params, workers = _cycle_node(serve_factory, tmp_path)
    diffs = [diff_of(i) for i in range(3)]

    def crash() -> None:
        node.kill9()
        node.start()

    _through_masked(workers, diffs, params, after_share=crash)
    _unmask_and_check_the_mean(admin, workers, diffs, params)


def test_durability_cycle_kill9_after_masked_inputs_expires_the_cycle(serve_factory, tmp_path):
    """The restarted node has lost the sum: the cycle expires with nothing aggregated, and
    the next one, on the same checkpoint, completes with exactly its own inputs."""
    node, admin, params, workers = _cycle_node(serve_factory, tmp_path)
    _through_masked(workers, [diff_of(i) for i in range(3)], params)
    node.kill9()
    node.start()
    st, reply = workers[0].send(m.UNMASK)
    assert st == 200 and reply["status"] == "aborted", reply
    assert "masked running sum was lost" in reply["reason"]
    status = admin.status()
    assert [(c["sequence"], c["status"]) for c in status["cycles"]] == [
        (1, "expired"), (2, "open")
    ], status
    assert [c["number"] for c in status["checkpoints"]] == [1]
    again = [Driver(node.url, params) for _ in range(3)]
    fresh = [diff_of(10 + i) for i in range(3)]
    _through_masked(again, fresh, params)
    _unmask_and_check_the_mean(admin, again, fresh, params)


@pytest.mark.postgres
def test_durability_cycle_with_secure_aggregation_is_refused_on_postgresql(
    serve_factory, pg_fresh_db
):
    """Any server process may take a masked input: one process's sum is not the cycle's."""
    node = serve_factory(pg_fresh_db)
    admin = Admin(node.url)
    r = admin.host(host_payload(server_config={**CONFIG, "durability": "cycle"}))
    assert r.status_code == 400, r.text
    assert "durability 'cycle' with secure_aggregation needs a single server" in r.json()["error"]
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404
