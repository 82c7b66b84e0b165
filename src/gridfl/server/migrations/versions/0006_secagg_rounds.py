"""secure aggregation: one row of protocol state per cycle

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column(
            "cycle_id",
            sa.Integer,
            sa.ForeignKey("cycles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("stage_at", sa.Float, nullable=False),
        sa.Column("first_at", sa.Float, nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("total", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("secagg_rounds")
