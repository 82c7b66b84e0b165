"""secure aggregation: when the open stage times out, for the deadline timer

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("secagg_rounds") as batch:
        batch.add_column(sa.Column("due_at", sa.Float, nullable=True))
    op.create_index("ix_secagg_rounds_due_at", "secagg_rounds", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_secagg_rounds_due_at", table_name="secagg_rounds")
    with op.batch_alter_table("secagg_rounds") as batch:
        batch.drop_column("due_at")
