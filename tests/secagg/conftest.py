"""Fixtures of the secure-aggregation tests that run several ``gridfl serve`` processes."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_db(request, tmp_path):
    """A database URL that several server processes share (SQLite file or PostgreSQL)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'grid.db'}"
    return request.getfixturevalue("pg_fresh_db")
