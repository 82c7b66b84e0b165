"""aggregation strategies: optimizer state per checkpoint, kept diffs per cycle

``strategy_states`` holds a server optimizer's moments after the cycle that produced a
checkpoint, written in the transaction that writes the checkpoint, so a crash never
separates the two. ``cycle_diffs`` keeps each report of an open cycle whose strategy needs
every diff (median, trimmed mean, Krum, Bulyan) until the cycle closes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "strategy_states",
        sa.Column(
            "checkpoint_id",
            sa.Integer,
            sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "process_id",
            sa.Integer,
            sa.ForeignKey("processes.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("summary", sa.JSON, nullable=False),
        sa.Column("layout", sa.JSON, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "ix_strategy_states_process", "strategy_states", ["process_id", "checkpoint_id"]
    )
    op.create_table(
        "cycle_diffs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_cycle_diffs_cycle", "cycle_diffs", ["cycle_id"])


def downgrade() -> None:
    op.drop_index("ix_cycle_diffs_cycle", table_name="cycle_diffs")
    op.drop_table("cycle_diffs")
    op.drop_index("ix_strategy_states_process", table_name="strategy_states")
    op.drop_table("strategy_states")
