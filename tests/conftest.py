"""Fixtures shared by every test directory: the live grid node (in a thread or as a
``gridfl serve`` process) and the databases it runs on. The classes and builders behind
them are in tests/harness.py and tests/builders.py; test modules import from there."""

from __future__ import annotations

import os

import pytest

# Compiles in tests (and the processes they start) really compile; tests of the plan
# cache give it a directory of their own.
os.environ["GRIDFL_PLAN_CACHE"] = "off"

from tests.builders import private_postgres_database, reset_postgres_schema, rsa_key_pair
from tests.harness import InProcessNode, LiveNode, Serve, make_settings


@pytest.fixture(scope="session")
def rsa_keys() -> tuple[str, str]:
    """One RSA key pair (PEM) for the session: (private PKCS8, public SubjectPublicKeyInfo);
    generating one takes ~0.1 s."""
    return rsa_key_pair()


# --------------------------------------------------------------------------- databases
@pytest.fixture(scope="session")
def pg_database():
    """A private PostgreSQL database for this test session (dropped at the end)."""
    with private_postgres_database("gridfl_t") as url:
        yield url


@pytest.fixture
def pg_fresh_db():
    """A new, empty PostgreSQL database for one test (dropped afterwards)."""
    with private_postgres_database("gridfl_f") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """Both storage backends: a fresh SQLite file, or a freshly emptied PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'grid.db'}"
    url = request.getfixturevalue("pg_database")
    reset_postgres_schema(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'grid.db'}"


# --------------------------------------------------------------------------- the live node
@pytest.fixture
def server_factory(tmp_path, sqlite_url):
    """``start(db_url=None, **settings) -> LiveNode``: a node in a thread on ``db_url`` (an
    SQLite file by default) with :func:`~tests.harness.make_settings`; stopped afterwards."""
    pytest.importorskip("starlette")
    started: list[LiveNode] = []

    def start(db_url: str | None = None, **settings) -> LiveNode:
        node = LiveNode(make_settings(db_url or sqlite_url, tmp_path, **settings))
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def server(server_factory) -> LiveNode:
    """A live node on a fresh SQLite file."""
    return server_factory()


@pytest.fixture
def in_process_node(tmp_path, sqlite_url):
    """The node's app on a fresh SQLite file, reached with no socket (``url`` works with
    the plain clients of tests/harness.py); for tests that need no real connection."""
    pytest.importorskip("starlette")
    node = InProcessNode(make_settings(sqlite_url, tmp_path))
    yield node
    node.stop()


@pytest.fixture
def serve_factory(tmp_path):
    """``start(database_url, **kw) -> Serve``: ``gridfl serve`` as a real process (for
    tests that kill it or run several); stopped afterwards."""
    started: list[Serve] = []

    def start(database_url: str, **kw) -> Serve:
        s = Serve(database_url, tmp_path, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
