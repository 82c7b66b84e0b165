"""Database engine, migrations and transactions (SQLite or PostgreSQL, one code path)."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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
            # writers take the database write lock up front: no upgrade deadlocks (on the
            # driver: every transaction begins here, SQLAlchemy's execute costs 10x more)
            write = conn.get_execution_options().get("gridfl_write")
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")

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
    """A read transaction: its statements see one snapshot of the database."""
    with engine.connect() as conn, conn.begin():
        yield conn


@contextlib.contextmanager
def lookup(engine: Engine) -> Iterator[Connection]:
    """A connection for reads that need no snapshot across statements: each sees the
    latest commits. :class:`Prepared` statements on it run without a BEGIN and COMMIT of
    their own (others begin a transaction, rolled back at the end)."""
    with engine.connect() as conn:
        yield conn


# SQL, default parameters, required parameter names, positional order (None: named)
_Compiled = tuple[str, dict, frozenset[str], "tuple[str, ...] | None"]


class Prepared:
    """A Core statement run straight on the driver's cursor, inside the transaction of the
    SQLAlchemy connection given: compiled once per dialect, then about 2 us a statement
    where SQLAlchemy's execution path (cache lookup, execution context, events, result
    wrapping) takes about 20. For the handful of statements every report runs.

    Values go to the driver as they are, so parameters and columns must be of types the
    driver handles itself (integers, floats, strings, None). Rows are named tuples.

    >>> import sqlalchemy as sa
    >>> t = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    >>> engine = sa.create_engine("sqlite://")
    >>> t.metadata.create_all(engine)
    >>> add = Prepared(t.insert().values(id=sa.bindparam("id")))
    >>> above = Prepared(sa.select(t.c.id).where(t.c.id > sa.bindparam("floor")))
    >>> with engine.begin() as conn:
    ...     add.run(conn, {"id": 7}), above.first(conn, {"floor": 1})
    (1, Row(id=7))
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        names = statement.selected_columns.keys() if hasattr(statement, "selected_columns") else []
        self._row = collections.namedtuple("Row", names, rename=True) if names else None
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, dialect) -> _Compiled:
        hit = self._compiled.get(dialect.name)
        if hit is None:
            compiled = self.statement.compile(dialect=dialect)
            defaults = dict(compiled.params)
            # columns whose Python-side default SQLAlchemy would compute at execution
            for column in compiled.insert_prefetch:
                if column.default is None or not column.default.is_scalar:
                    raise ValueError(f"{column} needs a default computed in Python: bind it")
                defaults[column.key] = column.default.arg
            if compiled.update_prefetch:
                raise ValueError(f"{self.statement} has columns updated by a Python default")
            required = frozenset(k for k, b in compiled.binds.items() if b.required)
            order = tuple(compiled.positiontup) if compiled.positional else None
            hit = self._compiled[dialect.name] = (compiled.string, defaults, required, order)
        return hit

    def _execute(self, conn: Connection, params: Mapping[str, Any]):
        sql, defaults, required, order = self._for(conn.dialect)
        if not required <= params.keys():
            raise KeyError(f"missing parameters {sorted(required - params.keys())} for {sql!r}")
        values = {**defaults, **params}
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql, values if order is None else tuple(values[n] for n in order))
        return cursor

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute; the number of rows it changed."""
        cursor = self._execute(conn, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any]):
        """Execute; the first row, or None."""
        cursor = self._execute(conn, params)
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else self._row._make(row)  # type: ignore[union-attr]

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list:
        """Execute; every row."""
        cursor = self._execute(conn, params)
        try:
            return [self._row._make(r) for r in cursor.fetchall()]  # type: ignore[union-attr]
        finally:
            cursor.close()


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
