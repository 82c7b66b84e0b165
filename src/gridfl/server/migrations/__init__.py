"""Alembic migrations of the grid node database (run programmatically on startup)."""
