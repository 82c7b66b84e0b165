"""The SQLite engine's WAL checkpoints run on their own thread, never inside a commit."""

from __future__ import annotations

import os
import threading
import time

import sqlalchemy as sa

from gridfl.server import db


def _wal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gridfl-wal"]


def test_commits_leave_the_wal_to_the_checkpoint_thread(tmp_path):
    path = tmp_path / "grid.db"
    before = len(_wal_threads())
    engine = db.create_engine(f"sqlite:///{path}")
    try:
        assert len(_wal_threads()) == before + 1
        with db.write(engine) as conn:
            # automatic checkpoints are off on the engine's connections
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
            conn.exec_driver_sql("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
            conn.execute(
                sa.text("INSERT INTO blobs (data) VALUES (:d)"), {"d": os.urandom(4 << 20)}
            )
        # the commit wrote the blob to the log only; the thread copies it into the file
        deadline = time.monotonic() + 10
        while path.stat().st_size < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size >= 4 << 20
    finally:
        engine.dispose()
    assert len(_wal_threads()) == before  # disposing the engine stops its thread


def test_status_lists_checkpoints_without_reading_their_models(tmp_path):
    """In SQLite a checkpoint's created_at is stored after its model blob: the status's
    checkpoint listing must come from the covering index (migration 0002), or every poll
    walks megabytes of overflow pages per checkpoint listed."""
    from gridfl.server import GridNode, Settings
    from gridfl.server import storage as q

    node = GridNode(Settings(data_dir=tmp_path))
    try:
        compiled = q.checkpoint_listing.compile(dialect=node.engine.dialect)
        values = compiled.construct_params({"process_id": 1, "last": 4})
        params = [values[k] for k in compiled.positiontup]
        with node.engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled.string}",
                                        tuple(params)).all()
        # SQLite before 3.36 says "SEARCH TABLE checkpoints ..."
        assert len(plan) == 1 and "USING COVERING INDEX ix_checkpoints_listing" in plan[0][-1]
    finally:
        node.close()
