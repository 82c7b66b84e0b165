"""Migration 0010 (one row per worker message) on a round in flight: a node is killed
after two of three masked inputs, the schema goes down to 0008 (the whole round as one
JSON state) and a new ``gridfl serve`` upgrades it again; the round goes on from the
converted rows and completes with the weighted mean of the clipped diffs (numpy)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from gridfl.secagg import SecAggParams
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import encode
from gridfl.server import db, tables
from tests.builders import diff_of, host_payload
from tests.harness import Admin
from tests.secagg._drive import Driver, assert_weighted_mean_step

CONFIG = {
    "max_workers": 3,
    "max_diffs": 3,
    "secure_aggregation": {"threshold": 2, "clipping_range": 0.5},
}


def _downgrade_to_0008(url: str) -> dict:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = db.alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")
        with engine.connect() as conn:
            assert "secagg_messages" not in sa.inspect(conn).get_table_names()
            return conn.execute(sa.select(tables.secagg_rounds.c.state)).scalar_one()
    finally:
        engine.dispose()


def test_a_round_in_flight_survives_down_and_up_migration(serve_factory, shared_db):
    first = serve_factory(shared_db)
    admin = Admin(first.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(first.url, params) for _ in range(3)]
    diffs = [diff_of(i) for i in range(3)]
    for w in workers:
        w.ok(m.ADVERTISE, w.session.advertise().to_json())
    for w in workers:
        roster = m.Roster.from_json(w.ok(m.SHARE)["message"])
        w.ok(m.SHARE, w.session.share_keys(roster).to_json())

    def send_masked(i: int, w: Driver) -> None:
        forwarded = m.EncryptedShares.from_json(w.ok(m.MASKED)["message"])
        vec = encode(diffs[i], 10 + i, params)
        w.ok(m.MASKED, w.session.masked_vector(forwarded, vec).to_json())

    for i, w in enumerate(workers[:2]):
        send_masked(i, w)
    first.kill9()

    old = _downgrade_to_0008(shared_db)
    # the old layout: every message back in the round's one JSON state
    assert sorted(old["keys"]) == sorted(old["shared"]) == sorted(w.wid for w in workers)
    assert old["masked"] == sorted(w.wid for w in workers[:2])

    second = serve_factory(shared_db)  # upgrades to the newest revision on start
    for w in workers:
        w.move_to(second.url)
    send_masked(2, workers[2])
    for w in workers:
        request = m.UnmaskRequest.from_json(w.ok(m.UNMASK)["message"])
        w.ok(m.UNMASK, w.session.unmask(request).to_json())

    admin = Admin(second.url)
    assert [c["status"] for c in admin.status()["cycles"]][:1] == ["completed"]
    original, new = admin.checkpoint(1), admin.checkpoint(2)
    assert_weighted_mean_step(original, new, diffs, [10, 11, 12], params)
