"""Alembic environment: gridfl runs migrations in code, on a connection it passes in."""

from __future__ import annotations

from alembic import context

from gridfl.server.tables import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through gridfl.server.db.migrate
    raise RuntimeError("run gridfl migrations through gridfl.server.db.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
