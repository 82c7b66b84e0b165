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
