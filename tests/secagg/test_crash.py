"""Secure aggregation across server processes and a ``kill -9`` (``gridfl serve`` as real
processes on one SQLite file or PostgreSQL database): the stage state is in the database,
so after a crash in any stage another process takes over and the cycle completes once,
with the sum of the workers' quantized diffs."""

from __future__ import annotations

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
