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
        checkpointer = None
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            checkpointer = WalCheckpointer(u.database)
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
            if checkpointer is not None:
                cur.execute("PRAGMA wal_autocheckpoint=0")  # WalCheckpointer does it
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
        if checkpointer is not None:
            event.listen(engine, "engine_disposed", lambda _engine: checkpointer.stop())
            checkpointer.start()
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)


class WalCheckpointer:
    """Copies SQLite's write-ahead log into the database file on a thread of its own.

    Left to itself, SQLite checkpoints inside whichever commit crosses
    ``wal_autocheckpoint`` and fsyncs the database there, while that writer still holds
    the write lock: with 2NN-sized diffs one report in ~60 took 150-250 ms and every
    writer queued behind it. Engines made here turn automatic checkpoints off; this
    thread runs PASSIVE checkpoints, which never block readers or writers, every
    ``interval`` seconds, and a last one when the engine is disposed.
    """

    def __init__(self, path: str, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gridfl-wal", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        import sqlite3

        conn = None
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    if conn is None:
                        conn = sqlite3.connect(  # mode=rw: never create a stray file
                            f"file:{self.path}?mode=rw", uri=True, timeout=60, isolation_level=None
                        )
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # the file is gone or busy: try again next time
                    log.debug("WAL checkpoint failed", exc_info=True)
                if stopping:
                    return
        finally:
            if conn is not None:
                conn.close()


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
