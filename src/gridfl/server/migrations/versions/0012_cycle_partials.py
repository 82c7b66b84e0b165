"""durability "cycle" with several server processes: each process's partial sums of a
cycle, and when the cycle began closing

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cycles") as batch:
        batch.add_column(sa.Column("closing_at", sa.Float, nullable=True))
    op.create_table(
        "cycle_partials",
        sa.Column(
            "cycle_id",
            sa.Integer,
            sa.ForeignKey("cycles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("instance_id", sa.String(32), primary_key=True),
        sa.Column("num_reports", sa.Integer, nullable=False),
        sa.Column("written_at", sa.Float, nullable=True),
        sa.Column("count_w", sa.Integer, nullable=False, server_default="0"),
        sa.Column("count_x", sa.Integer, nullable=False, server_default="0"),
        sa.Column("weight", sa.Float, nullable=False, server_default="0"),
        sa.Column("sum_w", sa.LargeBinary, nullable=True),
        sa.Column("sum_x", sa.LargeBinary, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("cycle_partials")
    with op.batch_alter_table("cycles") as batch:
        batch.drop_column("closing_at")
