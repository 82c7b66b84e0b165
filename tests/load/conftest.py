"""Fixtures of the fault and load tests (defined in tests/_faultkit.py)."""

from tests._faultkit import pg_cluster, pg_fresh_db, serve_factory  # noqa: F401
