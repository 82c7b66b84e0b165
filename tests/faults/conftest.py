"""Fixtures of the fault tests (the live node and databases are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests._faultkit import PgCluster


@pytest.fixture
def pg_cluster():
    """A private PostgreSQL cluster the test may stop and start (destroyed afterwards)."""
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fault_db(request, tmp_path):
    """Both storage backends as a fresh database for one test: an SQLite file, or a new
    PostgreSQL database (dropped afterwards)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'grid.db'}"
    return request.getfixturevalue("pg_fresh_db")
