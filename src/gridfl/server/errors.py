"""Errors to HTTP status codes and WebSocket error replies: a :class:`GridError` carries
its own ``http_status``; any other gridfl error about a bad value is a 400; the database
being out of reach is a 503; anything else is a 500, logged."""

from __future__ import annotations

import logging

from gridfl._exceptions import GridError, GridflError, UnavailableError

log = logging.getLogger("gridfl.server")

#: what a worker is told when the database cannot be reached (the request did nothing)
MSG_DATABASE_UNAVAILABLE = "the database is unavailable ({what}); retry later"


def database_unavailable(exc: BaseException) -> UnavailableError | None:
    """An :class:`UnavailableError` (503, retryable) when ``exc`` means the database cannot
    serve now: connection refused or lost (PostgreSQL stopped or restarting), connection
    pool exhausted, SQLite busy/locked past its timeout. ``None`` for anything else."""
    try:
        import sqlalchemy.exc as sa_exc
    except ImportError:  # pragma: no cover
        return None
    what = None
    if isinstance(exc, sa_exc.TimeoutError):  # QueuePool limit reached, no connection freed
        what = "no free database connection"
    elif isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated
        or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    ):
        # psycopg OperationalError: connection refused / server closed the connection /
        # admin shutdown / deadlock or serialization failure (rolled back);
        # sqlite3 OperationalError: only "database is locked/busy" and I/O trouble
        # ("no such table" and the like are bugs: 500)
        text = str(getattr(exc, "orig", None) or exc).strip()
        sqlite = type(getattr(exc, "orig", None)).__module__.startswith("sqlite3")
        if not sqlite or any(w in text for w in ("locked", "busy", "I/O", "unable to open")):
            what = (text.splitlines() or [""])[0][:200]
    if what is None:
        return None
    err = UnavailableError(MSG_DATABASE_UNAVAILABLE.format(what=what))
    err.__cause__ = exc
    return err


def to_status(exc: BaseException) -> tuple[int, str]:
    """``(http status, message)`` for any exception; unknown ones are 500 and logged."""
    unavailable = database_unavailable(exc)
    if unavailable is not None:
        log.warning("database unavailable: %s", unavailable)
        exc = unavailable
    if isinstance(exc, GridError):
        return exc.http_status, str(exc)
    if isinstance(exc, GridflError) and isinstance(exc, ValueError):
        return 400, str(exc)  # a bad value (State bytes, a plan, a config): the caller's
    if type(exc).__name__ == "ClientDisconnect":  # starlette: the client went away mid-body
        log.info("client disconnected while sending its request")
        return 400, "client disconnected"
    log.error("internal error", exc_info=exc)
    return 500, f"internal server error ({type(exc).__name__})"


def drop_tracebacks(exc: BaseException | None) -> None:
    """Forget an answered error's tracebacks (its causes' too).

    An error raised in a worker thread sits in a reference cycle (anyio's future, the
    error, its traceback, the awaiting frame) that only the cyclic GC frees, and an idle
    node rarely runs it: until then every frame's locals live on, among them a refused
    report's body and diff (four 60 MiB reports kept ~1 GB). Without the tracebacks the
    frames, and the bytes, are freed at once.
    """
    while exc is not None and exc.__traceback__ is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
