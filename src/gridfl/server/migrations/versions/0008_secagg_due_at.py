"""secure aggregation: when the open stage times out (for the deadline timer), a version
per round (so a server process may reuse the round it holds in memory), and the running
sum in a table of its own (SQLite rewrites a whole row on update: the round's small
writes no longer rewrite a sum of 8 bytes per parameter)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secagg_totals",
        sa.Column(
            "cycle_id",
            sa.Integer,
            sa.ForeignKey("cycles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("total", sa.LargeBinary, nullable=False),
    )
    op.execute(
        "INSERT INTO secagg_totals (cycle_id, total) "
        "SELECT cycle_id, total FROM secagg_rounds WHERE stage <> 'aborted'"
    )
    with op.batch_alter_table("secagg_rounds") as batch:
        batch.add_column(sa.Column("due_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="0"))
        batch.drop_column("total")
    op.create_index("ix_secagg_rounds_due_at", "secagg_rounds", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_secagg_rounds_due_at", table_name="secagg_rounds")
    with op.batch_alter_table("secagg_rounds") as batch:
        batch.add_column(sa.Column("total", sa.LargeBinary, nullable=False, server_default=""))
        batch.drop_column("due_at")
        batch.drop_column("version")
    op.execute(
        "UPDATE secagg_rounds SET total = (SELECT t.total FROM secagg_totals t "
        "WHERE t.cycle_id = secagg_rounds.cycle_id) "
        "WHERE cycle_id IN (SELECT cycle_id FROM secagg_totals)"
    )
    op.drop_table("secagg_totals")
