"""Database engine, migrations and transactions (SQLite or PostgreSQL, one code path)."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("gridfl.server")

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x67726964  # "grid"
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


def create_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite: WAL, busy timeout, foreign keys, explicit BEGIN."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=8,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            # 64 KiB pages (takes effect on a new database only): multi-MB blobs (models,
            # running aggregates) are written in 16x fewer overflow pages
            cur.execute("PRAGMA page_size=65536")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover - trivial
            # writers take the database write lock up front: no upgrade deadlocks
            if conn.get_execution_options().get("gridfl_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

        # SQLite has one writer at a time and its busy handler sleeps in growing steps
        # (up to 100 ms) while it waits; writers of this process queue on a lock instead,
        # and are handed the database the moment the previous one commits.
        _WRITE_LOCKS[engine] = threading.RLock()
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A write transaction (SQLite: BEGIN IMMEDIATE). Commits on success, rolls back on error."""
    lock = _WRITE_LOCKS.get(engine)
    with lock or contextlib.nullcontext(), engine.connect() as conn:
        conn = conn.execution_options(gridfl_write=True)
        with conn.begin():
            yield conn


@contextlib.contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration; safe when several servers start at once."""
    from alembic import command

    cfg = alembic_config()
    with write(engine) as conn:
        if is_postgres(engine):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
